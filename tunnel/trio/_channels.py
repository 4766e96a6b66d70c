"""Channels for trio code: a tunnel's, a pool of reverse tunnels, a healing one.

Each is a ``grpclib.client.Channel``, so generated stubs (grpclib's,
betterproto's, betterproto2's) take them unchanged; each call they make is a
``TrioClientStream`` that the calling trio task drives itself.  Client
events listened on the asyncio channel underneath (``.aio``) fire for these
calls, in the trio task, so listeners must be trio code or plain awaits.
"""

from __future__ import annotations

from typing import Any, TypeVar

import grpclib.client
import trio
from grpclib.const import Cardinality
from grpclib.metadata import Deadline
from grpclib.protocol import Peer
from multidict import MultiDict

from .. import _reconnecting as _aio_reconnecting
from .. import channel as _aio_channel
from .. import reverse as _aio_reverse
from .._seam import MetadataLike
from . import _layer
from ._bridge import asyncio_kwargs, hop
from ._streams import TrioClientStream

__all__ = ["ReconnectingTunnelChannel", "ReverseChannel", "TunnelChannel", "asyncio_channel"]

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")

#: Seconds beyond the tunnel's own ``close_timeout`` that ``aclose`` waits.
CLOSE_MARGIN = 1.0


def asyncio_channel(channel: grpclib.client.Channel) -> grpclib.client.Channel:
    """The asyncio channel under a trio one (tunnels nest), or ``channel`` itself."""
    aio = getattr(channel, "aio", None)
    return aio if isinstance(aio, grpclib.client.Channel) else channel


class _TrioChannel(grpclib.client.Channel):
    """What the trio channels share: calls driven by the calling trio task."""

    aio: Any

    # grpclib's Channel.__init__ is deliberately not called (no connection).
    def __init__(self, aio: Any) -> None:
        self.aio = aio
        self._protocol = None

    def _call_parts(self) -> tuple[Any, Any, Any]:
        """The next call's tunnel (or trio function finding it) and codecs."""
        raise NotImplementedError

    def _call_options(self) -> dict[str, Any]:
        """More keyword arguments of the call's stream (none by default)."""
        return {}

    def request(
        self,
        name: str,
        cardinality: Cardinality,
        request_type: type[_SendType],
        reply_type: type[_RecvType],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> TrioClientStream[_SendType, _RecvType]:
        tunnel, codec, details_codec = self._call_parts()
        return TrioClientStream.for_call(
            tunnel,
            name,
            cardinality,
            request_type,
            reply_type,
            timeout=timeout,
            deadline=deadline,
            metadata=metadata,
            codec=codec,
            status_details_codec=details_codec,
            dispatch=self.aio.__dispatch__,
            **self._call_options(),
        )

    async def __connect__(self) -> Any:
        raise RuntimeError(f"a {type(self).__name__} has no connection of its own")

    def __del__(self) -> None:
        pass  # grpclib's warns about an HTTP/2 connection we never have

    def __repr__(self) -> str:
        return f"<trio {self.aio!r}>"


class _ClosableTrioChannel(_TrioChannel):
    """A trio channel that owns what it calls through, and closes it."""

    def _close_timeout(self) -> float:
        raise NotImplementedError

    @property
    def error(self) -> BaseException | None:
        """Why the (last) tunnel ended other than by a clean close; see ``aio.error``."""
        error: BaseException | None = self.aio.error
        return error

    @property
    def closed(self) -> bool:
        return bool(self.aio.closed)

    def close(self) -> None:
        """Cancel every call in flight and end the tunnel."""
        self.aio.close()

    async def wait_closed(self) -> None:
        """Wait until the tunnel and everything of this channel are over."""
        await hop(self.aio.wait_closed)

    async def aclose(self) -> None:
        """``close()``, then wait (shielded, bounded) until ``wait_closed()`` returns.

        Shielded so that leaving a cancelled scope still leaves nothing of
        the tunnel running; bounded by the tunnel's ``close_timeout``.
        """
        self.close()
        with trio.CancelScope(shield=True):
            with trio.move_on_after(self._close_timeout() + CLOSE_MARGIN):
                await self.wait_closed()

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


class TunnelChannel(_ClosableTrioChannel):
    """A tunnel's channel for trio code: every call reaches the tunnel's backend.

    ``aio`` is the asyncio ``tunnel.TunnelChannel`` underneath (for event
    listeners, and to nest tunnels: ``open_tunnel`` takes either).
    """

    aio: _aio_channel.TunnelChannel

    def _call_parts(self) -> tuple[Any, Any, Any]:
        return _layer.call_parts(self.aio)

    @property
    def peer(self) -> Peer | None:
        return self.aio.peer

    @property
    def metadata(self) -> MultiDict[Any]:
        """The metadata the tunnel was opened with."""
        return self.aio.metadata

    def _close_timeout(self) -> float:
        return _layer.close_timeout(self.aio)

    async def __aenter__(self) -> TunnelChannel:
        return self


class ReverseChannel(_TrioChannel):
    """A pool of reverse tunnels as one channel, for trio code (round-robin).

    With no tunnel in the pool a call fails at once with UNAVAILABLE, as
    with asyncio.  ``aio`` is the asyncio ``tunnel.ReverseChannel``.
    """

    aio: _aio_reverse.ReverseChannel

    def _call_parts(self) -> tuple[Any, Any, Any]:
        return _layer.call_parts(_layer.pick_reverse(self.aio))

    def _call_options(self) -> dict[str, Any]:
        # As the asyncio pool does: a call its tunnel refuses (draining) is
        # started again, once, on another tunnel of the pool.
        return {"pick_another": _layer.reverse_pick_another(self.aio)}

    def is_ready(self) -> bool:
        """True if a call made now has a tunnel to go to."""
        return self.aio.is_ready()

    async def wait_ready(self) -> None:
        """Return as soon as the pool has a usable tunnel (bound it yourself)."""
        await hop(self.aio.wait_ready)

    def close(self) -> None:
        """Nothing to close: the tunnels belong to their handler."""


class ReconnectingTunnelChannel(_ClosableTrioChannel):
    """``tunnel.ReconnectingTunnelChannel`` for trio: a forward channel that heals.

    It reopens its tunnel when it drops, with the asyncio class's policy
    (keyword arguments passed through).  A call made while a tunnel is open
    goes to it at once; while there is none, it waits or fails fast as that
    policy says, bounded by the call's deadline and cancelled with its trio
    scope.  ``aio`` is the asyncio channel underneath.
    """

    aio: _aio_reconnecting.ReconnectingTunnelChannel

    def __init__(self, channel: grpclib.client.Channel, **kwargs: Any) -> None:
        super().__init__(
            _aio_reconnecting.ReconnectingTunnelChannel(
                asyncio_channel(channel), **asyncio_kwargs(kwargs)
            )
        )

    def _call_parts(self) -> tuple[Any, Any, Any]:
        return _layer.reconnecting_call_parts(self.aio)

    @property
    def tunnel(self) -> TunnelChannel | None:
        """The tunnel calls go to now, if one is open."""
        current = self.aio.tunnel
        return None if current is None else TunnelChannel(current)

    @property
    def tunnels_opened(self) -> int:
        return self.aio.tunnels_opened

    async def wait_ready(self) -> TunnelChannel:
        """Wait for an open tunnel (bound it yourself); raise if there will be none."""
        return TunnelChannel(await hop(self.aio.wait_ready))

    def _close_timeout(self) -> float:
        return _layer.reconnecting_close_timeout(self.aio)

    async def __aenter__(self) -> ReconnectingTunnelChannel:
        await hop(self.aio.__aenter__)
        return self
