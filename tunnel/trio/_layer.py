"""Every place the trio layer reaches into the asyncio layer's private parts.

The trio layer drives tunneled calls from trio tasks without a crossing per
operation (see ``_bridge``).  For that it builds call streams itself and
lets them wait the trio way, which needs a few attributes the asyncio layer
keeps private.  Each such touch is a small function here, so a change in
the asyncio layer breaks here, by name, and nowhere else; every test
under ``tests/trio`` goes through them.

The touches, one line each (keep this list in step with the code):

* ``TunnelChannel``: ``_tunnel``, ``_codec``, ``_status_details_codec``
  (to build a call on it); ``ClientTunnel.options``.
* ``ReverseChannel``: ``_pools.pick(_key)`` and ``_description`` (which
  tunnel a call goes to, and the UNAVAILABLE message when there is none),
  ``_pick_tunnel`` (another tunnel for a call its first one refused).
* ``ReconnectingTunnelChannel``: ``_acquire()`` (the tunnel for a call,
  waiting or failing fast by its policy), ``_codec``,
  ``_status_details_codec`` and ``_options``.
* ``ClientTunnel.queue_messages`` / ``ServerTunnel.core`` and ``.driver``:
  queue a message without waiting, wake the writer, read how much a stream
  has queued, and ``Driver.within_send_buffer``, whether a sender must
  wait.
* ``TunnelServerStream._changed`` and ``._tunnel``: the event a tunneled
  handler waits on, and the tunnel it sends through.
"""

from __future__ import annotations

from typing import Any

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .._driver import Driver
from .._reconnecting import ReconnectingTunnelChannel
from .._server_stream import TunnelServerStream
from ..channel import TunnelChannel
from ..reverse import ReverseChannel
from ._bridge import hop

__all__ = [
    "call_parts",
    "close_timeout",
    "pick_reverse",
    "queued_within_buffer",
    "reconnecting_call_parts",
    "reconnecting_close_timeout",
    "reverse_pick_another",
    "server_stream_parts",
    "set_server_stream_parts",
]


def call_parts(channel: TunnelChannel) -> tuple[Any, Any, Any]:
    """The tunnel, codec and status-details codec a call on ``channel`` uses."""
    return channel._tunnel, channel._codec, channel._status_details_codec


def close_timeout(channel: TunnelChannel) -> float:
    """How long the tunnel gives its peer to end the carrying call."""
    timeout: float = channel._tunnel.options.close_timeout
    return timeout


def reconnecting_call_parts(channel: ReconnectingTunnelChannel) -> tuple[Any, Any, Any]:
    """A trio function finding the next call's tunnel, and the channel's codecs.

    With a tunnel open it returns it without a crossing; otherwise it waits
    in asyncio, by the channel's own policy, for one.
    """

    async def acquire() -> Any:
        current = channel.tunnel
        if current is not None:
            return current._tunnel
        return await hop(channel._acquire)

    return acquire, channel._codec, channel._status_details_codec


def reconnecting_close_timeout(channel: ReconnectingTunnelChannel) -> float:
    """How long the channel's tunnels give their peer to end the carrying call."""
    timeout: float = channel._options.close_timeout
    return timeout


def pick_reverse(channel: ReverseChannel) -> TunnelChannel:
    """The reverse tunnel the next call goes to (round-robin), or UNAVAILABLE.

    Same choice and same error as ``ReverseChannel.request``.
    """
    picked = channel._pools.pick(channel._key)
    if picked is None:
        raise GRPCError(Status.UNAVAILABLE, f"no reverse tunnel {channel._description}")
    return picked


def reverse_pick_another(channel: ReverseChannel) -> Any:
    """What picks another tunnel of the pool for a refused call (``pick_another``)."""
    return channel._pick_tunnel


def queued_within_buffer(driver: Driver[Any, Any], stream_id: int) -> bool:
    """True if a sender on this stream need not wait for the writer now.

    The same test ``Driver.flushed`` starts with; only past it does a trio
    sender cross over to wait in asyncio.
    """
    return driver.within_send_buffer(stream_id)


def server_stream_parts(stream: TunnelServerStream[Any, Any]) -> tuple[Any, Any]:
    """The change event and the tunnel of a tunneled handler's stream."""
    return stream._changed, stream._tunnel


def set_server_stream_parts(
    stream: TunnelServerStream[Any, Any], changed: Any, tunnel: Any
) -> None:
    """Give a tunneled handler's stream a trio-waitable event and tunnel view."""
    stream._changed = changed
    stream._tunnel = tunnel
