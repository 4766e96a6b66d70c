"""``TunnelServiceHandler``: serves ``grpctunnel.v1.TunnelService``.

Give it the same handler objects a ``grpclib.server.Server`` takes, and put
it in the server's handler list: calls that arrive over forward tunnels run
those handlers' code.  Server events listened on the handler
(``grpclib.events.listen(handler, RecvRequest, ...)``) fire for tunneled
calls, as they would on a ``Server`` for direct ones.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Collection, Hashable, Mapping
from typing import Any

import grpclib.server
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError
from multidict import MultiDict

from ._carrier import StreamCarrier
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._retry import check_callback
from ._seam import ServerEvents, http2_pinger
from ._server_tunnel import ServerTunnel, TunnelInfo
from ._stats import TunnelStatistics
from ._typing import Servable
from ._violations import end_carrying_call
from .channel import MAX_STREAMS_HEADER, NEGOTIATE_HEADER, OPEN_TUNNEL, TunnelChannel
from .fallback import Fallback, with_fallback
from .options import TunnelOptions
from .reverse import (
    ALL,
    OPEN_REVERSE_TUNNEL,
    AffinityKey,
    ReverseChannel,
    ReversePools,
    TunnelCallback,
    serve_reverse_tunnel,
)

__all__ = ["TunnelServiceHandler"]


async def _end_carrying_call(stream: grpclib.server.Stream[Any, Any], timeout: float) -> None:
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await stream.send_trailing_metadata(
                status=Status.UNAVAILABLE, status_message="the tunnel's server is shutting down"
            )


class TunnelServiceHandler:
    """The server side of ``grpctunnel.v1.TunnelService``.

    With a ``fallback`` (see ``tunnel.fallback``), forward tunnels carry
    every method ``handlers`` do not serve to it, a ``Proxy`` say.
    """

    def __init__(
        self,
        handlers: Collection[Servable] = (),
        *,
        reverse_tunnels: bool = True,
        affinity_key: AffinityKey | None = None,
        on_reverse_tunnel_open: TunnelCallback | None = None,
        on_reverse_tunnel_close: TunnelCallback | None = None,
        options: TunnelOptions | None = None,
        fallback: Fallback | None = None,
    ) -> None:
        check_callback(affinity_key, "affinity_key")
        check_callback(on_reverse_tunnel_open, "on_reverse_tunnel_open")
        check_callback(on_reverse_tunnel_close, "on_reverse_tunnel_close")
        mapping: dict[str, Handler] = {}
        for handler in handlers:
            mapping.update(handler.__mapping__())
        # With a fallback, forward tunnels also carry every other method to it.
        self._mapping = with_fallback(mapping, fallback)
        self._fallback = fallback
        self._options = options or TunnelOptions()
        self.__dispatch__ = ServerEvents()
        self._codec = ProtoCodec()
        self._status_details_codec = ProtoStatusDetailsCodec()
        self._tunnels: set[ServerTunnel] = set()
        self._shutting_down = False
        self._reverse_tunnels = reverse_tunnels
        self._affinity_key = affinity_key
        self._on_reverse_open = on_reverse_tunnel_open
        self._on_reverse_close = on_reverse_tunnel_close
        self._pools = ReversePools()

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            OPEN_TUNNEL: Handler(
                self._open_tunnel, Cardinality.STREAM_STREAM, ClientToServer, ServerToClient
            ),
            OPEN_REVERSE_TUNNEL: Handler(
                self._open_reverse_tunnel,
                Cardinality.STREAM_STREAM,
                ServerToClient,
                ClientToServer,
            ),
        }

    def initiate_shutdown(self) -> None:
        """Every tunnel refuses new streams with UNAVAILABLE; running calls finish.

        Forward tunnels answer new streams with UNAVAILABLE; calls sent over
        reverse tunnels fail with UNAVAILABLE at once.
        """
        self._shutting_down = True
        for tunnel in self._tunnels:
            tunnel.initiate_shutdown()
        for channel in self._pools.channels():
            channel.initiate_shutdown()

    # -- reverse tunnels ---------------------------------------------------

    def as_channel(self) -> ReverseChannel:
        """All reverse tunnels as one channel (round-robin)."""
        return ReverseChannel(self._pools, ALL, "is open")

    def key_as_channel(self, key: Hashable) -> ReverseChannel:
        """The reverse tunnels with affinity ``key`` as one channel."""
        return ReverseChannel(self._pools, key, f"has affinity key {key!r}")

    def forward_statistics(self) -> list[TunnelStatistics]:
        """What each open forward tunnel of this handler carried so far.

        (A reverse tunnel's are its ``TunnelChannel.statistics()``.)
        """
        return [tunnel.statistics() for tunnel in self._tunnels]

    def all_reverse_tunnels(self) -> list[TunnelChannel]:
        """A snapshot of the open reverse tunnels."""
        return [c for c in self._pools.channels() if not c.closed]

    async def _open_tunnel(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        if not self._mapping and self._fallback is None:
            raise GRPCError(Status.UNIMPLEMENTED, "no services are exposed over forward tunnels")
        peer_negotiates = stream.metadata is not None and (
            stream.metadata.get(NEGOTIATE_HEADER) == "on"
        )
        response_md: MultiDict[Any] = MultiDict(
            {
                NEGOTIATE_HEADER: "on",
                MAX_STREAMS_HEADER: str(self._options.max_concurrent_streams),
            }
        )
        # Headers go out at once, before any frame: the reference does so,
        # and listeners may put credentials in them.
        await stream.send_initial_metadata(metadata=response_md)
        tunnel = ServerTunnel(
            StreamCarrier[ServerToClient, ClientToServer](
                stream, ClientToServer, max_frame_size=self._options.max_frame_size
            ),
            self._mapping,
            info=TunnelInfo(
                metadata=MultiDict(stream.metadata or ()),
                response_metadata=response_md,
                peer=stream.peer,
                kind="forward",
            ),
            dispatch=self.__dispatch__,
            codec=self._codec,
            status_details_codec=self._status_details_codec,
            options=self._options,
            peer_negotiates=peer_negotiates,
            user_agent=stream.user_agent,
            probe=http2_pinger(stream),
        )
        if self._shutting_down:
            tunnel.initiate_shutdown()
        self._tunnels.add(tunnel)
        try:
            await tunnel.serve()
        except asyncio.CancelledError:
            # grpclib's Server.close() cancels handlers and sends nothing, and
            # the connection stays open: the tunnel client, and every call in
            # it, would wait forever.  The handlers are cancelled by now and
            # the frame writer stopped, so end the carrying call with a
            # status ourselves.  If the client reset the call, this fails
            # quietly.
            await _end_carrying_call(stream, self._options.close_timeout)
            raise
        except Exception as exc:
            raise end_carrying_call(exc, kind="forward", peer=stream.peer) from None
        finally:
            self._tunnels.discard(tunnel)

    async def _open_reverse_tunnel(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        if not self._reverse_tunnels:
            raise GRPCError(Status.UNIMPLEMENTED, "reverse tunnels are not enabled")
        await serve_reverse_tunnel(
            stream,
            self._pools,
            options=self._options,
            affinity_key=self._affinity_key,
            on_open=self._on_reverse_open,
            on_close=self._on_reverse_close,
            draining=lambda: self._shutting_down,
        )
