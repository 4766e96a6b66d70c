"""Channels for trio code: a tunnel's, and a pool of reverse tunnels.

Both are ``grpclib.client.Channel`` objects, so generated stubs (grpclib's,
betterproto's, betterproto2's) take them unchanged; each call they make is a
``TrioClientStream`` that the calling trio task drives itself.  Client
events listened on the asyncio channel (``channel.aio``) fire for these
calls, in the trio task, so listeners must be trio code or plain awaits.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpclib.client
import trio
from grpclib.const import Cardinality
from grpclib.events import _DispatchChannelEvents
from grpclib.metadata import Deadline, _MetadataLike
from grpclib.protocol import Peer
from multidict import MultiDict

from .. import channel as _aio_channel
from .. import reverse as _aio_reverse
from . import _layer
from ._bridge import hop
from ._streams import TrioClientStream

__all__ = ["ReverseChannel", "TunnelChannel", "call_on"]

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")

#: Seconds beyond the tunnel's own ``close_timeout`` that ``aclose`` waits.
CLOSE_MARGIN = 1.0


def call_on(
    tunnel_channel: _aio_channel.TunnelChannel,
    dispatch: _DispatchChannelEvents,
    name: str,
    cardinality: Cardinality,
    request_type: type[_SendType],
    reply_type: type[_RecvType],
    timeout: float | None,
    deadline: Deadline | None,
    metadata: _MetadataLike | None,
) -> TrioClientStream[_SendType, _RecvType]:
    """A call on ``tunnel_channel`` for a trio task; events go to ``dispatch``."""
    if timeout is not None:
        timeout_deadline = Deadline.from_timeout(timeout)
        deadline = timeout_deadline if deadline is None else min(deadline, timeout_deadline)
    tunnel, codec, details_codec = _layer.call_parts(tunnel_channel)
    return TrioClientStream(
        tunnel,
        name,
        MultiDict(metadata or ()),
        cardinality,
        request_type,
        reply_type,
        codec=codec,
        status_details_codec=details_codec,
        dispatch=dispatch,
        deadline=deadline,
    )


class TunnelChannel(grpclib.client.Channel):
    """A tunnel's channel for trio code: every call reaches the tunnel's backend.

    ``aio`` is the asyncio ``tunnel.TunnelChannel`` underneath (for event
    listeners, and to nest tunnels: ``open_tunnel`` takes either).
    """

    # grpclib's Channel.__init__ is deliberately not called (no connection).
    def __init__(self, aio: _aio_channel.TunnelChannel) -> None:
        self.aio = aio
        self._protocol = None

    @property
    def peer(self) -> Peer | None:
        return self.aio.peer

    @property
    def error(self) -> BaseException | None:
        """Why the tunnel closed; None while open or after a clean close."""
        return self.aio.error

    @property
    def closed(self) -> bool:
        return self.aio.closed

    @property
    def metadata(self) -> MultiDict[Any]:
        """The metadata the tunnel was opened with."""
        return self.aio.metadata

    def request(
        self,
        name: str,
        cardinality: Cardinality,
        request_type: type[_SendType],
        reply_type: type[_RecvType],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: _MetadataLike | None = None,
    ) -> TrioClientStream[_SendType, _RecvType]:
        return call_on(
            self.aio,
            self.aio.__dispatch__,
            name,
            cardinality,
            request_type,
            reply_type,
            timeout,
            deadline,
            metadata,
        )

    async def __connect__(self) -> Any:
        raise RuntimeError("a TunnelChannel has no connection of its own")

    def close(self) -> None:
        """Cancel every call in flight and end the tunnel."""
        self.aio.close()

    async def wait_closed(self) -> None:
        """Wait until the tunnel and its carrying call are over."""
        await hop(self.aio.wait_closed)

    async def aclose(self) -> None:
        """Close, and wait (shielded, bounded) until the tunnel is over.

        Shielded so that leaving a cancelled scope still leaves nothing of
        the tunnel running; bounded by the tunnel's ``close_timeout``.
        """
        self.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(_layer.close_timeout(self.aio) + CLOSE_MARGIN):
                await self.wait_closed()

    async def __aenter__(self) -> TunnelChannel:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __del__(self) -> None:
        pass  # grpclib's warns about an HTTP/2 connection we never have

    def __repr__(self) -> str:
        return f"<trio {self.aio!r}>"


class ReverseChannel(grpclib.client.Channel):
    """A pool of reverse tunnels as one channel, for trio code (round-robin).

    With no tunnel in the pool a call fails at once with UNAVAILABLE, as
    with asyncio.  ``aio`` is the asyncio ``tunnel.ReverseChannel``.
    """

    # grpclib's Channel.__init__ is deliberately not called (no connection).
    def __init__(self, aio: _aio_reverse.ReverseChannel) -> None:
        self.aio = aio
        self._protocol = None

    def is_ready(self) -> bool:
        """True if a call made now has a tunnel to go to."""
        return self.aio.is_ready()

    async def wait_ready(self) -> None:
        """Return as soon as the pool has a usable tunnel (bound it yourself)."""
        await hop(self.aio.wait_ready)

    def request(
        self,
        name: str,
        cardinality: Cardinality,
        request_type: type[_SendType],
        reply_type: type[_RecvType],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: _MetadataLike | None = None,
    ) -> TrioClientStream[_SendType, _RecvType]:
        return call_on(
            _layer.pick_reverse(self.aio),
            self.aio.__dispatch__,
            name,
            cardinality,
            request_type,
            reply_type,
            timeout,
            deadline,
            metadata,
        )

    async def __connect__(self) -> Any:
        raise RuntimeError("a ReverseChannel has no connection of its own")

    def close(self) -> None:
        """Nothing to close: the tunnels belong to their handler."""

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<trio {self.aio!r}>"
