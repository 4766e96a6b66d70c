"""``TunnelServiceHandler``: serves ``grpctunnel.v1.TunnelService``.

Give it the same handler objects a ``grpclib.server.Server`` takes, and put
it in the server's handler list: calls that arrive over forward tunnels run
those handlers' code.  Server events listened on the handler
(``grpclib.events.listen(handler, RecvRequest, ...)``) fire for tunneled
calls, as they would on a ``Server`` for direct ones.  Reverse tunnels that
devices open are kept in pools, reached with ``key_as_channel`` and
``as_channel`` (``tunnel.reverse``).  How each carrying call is handled is
``_network_server``'s.
"""

from __future__ import annotations

from collections.abc import Collection, Hashable, Mapping
from typing import Any

import grpclib.server
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError

from ._network_server import AffinityKey, TunnelCallback, serve_forward, serve_reverse
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._pools import ALL_TUNNELS, Pools
from ._retry import check_callback
from ._server_tunnel import Handlers, ServerTunnel
from ._stats import TunnelStatistics
from ._typing import Servable
from ._wire import OPEN_REVERSE_TUNNEL, OPEN_TUNNEL
from .channel import TunnelChannel
from .fallback import Fallback
from .options import TunnelOptions
from .reverse import ReverseChannel

__all__ = ["TunnelServiceHandler"]


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
        # With a fallback, forward tunnels also carry every other method to it.
        self._handlers = Handlers.of(handlers, fallback)
        self._serves_forward = bool(self._handlers.mapping) or fallback is not None
        self._options = options or TunnelOptions()
        self.__dispatch__ = self._handlers.dispatch
        self._tunnels: set[ServerTunnel] = set()
        self._shutting_down = False
        self._reverse_tunnels = reverse_tunnels
        self._affinity_key = affinity_key
        self._on_reverse_open = on_reverse_tunnel_open
        self._on_reverse_close = on_reverse_tunnel_close
        self._pools = Pools()

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
        return ReverseChannel(self._pools, ALL_TUNNELS, "is open")

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

    # -- the carrying calls --------------------------------------------------

    async def _open_tunnel(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        if not self._serves_forward:
            raise GRPCError(Status.UNIMPLEMENTED, "no services are exposed over forward tunnels")
        await serve_forward(
            stream,
            self._handlers,
            options=self._options,
            tunnels=self._tunnels,
            shutting_down=self._shutting_down,
        )

    async def _open_reverse_tunnel(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        if not self._reverse_tunnels:
            raise GRPCError(Status.UNIMPLEMENTED, "reverse tunnels are not enabled")
        await serve_reverse(
            stream,
            self._pools,
            options=self._options,
            affinity_key=self._affinity_key,
            on_open=self._on_reverse_open,
            on_close=self._on_reverse_close,
            draining=self._shutting_down,
        )
