"""``grpctunnel router``: agents register by key, callers reach them by key.

One gRPC port serves three things:

* ``grpctunnel.v1.TunnelService``: agents open reverse tunnels and register
  under a key (the ``grpctunnel-agent-key`` request header), after their
  bearer token was checked against ``--agent-tokens``;
* ``grpc.health.v1.Health`` (grpclib's): SERVING until the router drains;
* every other method: a ``tunnel.Proxy`` sends the call to the agent whose
  key the caller names in ``--key-header``, through its reverse tunnel.

Registration, in order.  A ``RecvRequest`` listener sees every
``OpenReverseTunnel`` before the tunnel is negotiated, and refuses it
cheaply: UNAVAILABLE while draining, INVALID_ARGUMENT without a key,
UNAUTHENTICATED for a missing or unknown token, PERMISSION_DENIED for a key
the token may not take, ALREADY_EXISTS under ``--on-duplicate reject`` when
another agent holds the key.  Then the tunnel's affinity key function
applies the duplicate policy again, synchronously with the pool insertion
(two agents racing for a key are decided there), and retires the tunnels
the newcomer replaces: they take no new calls, their calls finish (up to
``--grace-period``) and they close.  A tunnel from the same agent instance
(a reconnect the router had not noticed yet) always replaces the stale one.

Shutdown (SIGTERM/SIGINT): /readyz and Health turn NOT_SERVING, new tunnels
and calls are refused with UNAVAILABLE, calls in flight get up to
``--grace-period`` to finish, then the tunnels and the server close and the
process exits 0.

Replicas (``--registry``): the router records the keys it holds in a
shared registry and forwards calls for keys other routers hold to them
(``_cluster``); the duplicate policy then spans every router: ``reject``
claims the key in the registry before accepting a tunnel, ``replace``
retires the tunnels that a newer registration elsewhere supersedes.  On
SIGTERM the router withdraws its entries first, so that no new call is
sent its way.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import ssl
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import grpclib.client
import grpclib.server
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.health.check import ServiceStatus
from grpclib.health.service import OVERALL, Health
from grpclib.protocol import Peer
from multidict import MultiMapping
from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import _seam
from .._tunnel import EndReason
from .._wire import OPEN_REVERSE_TUNNEL
from ..channel import TunnelChannel
from ..fallback import install_fallback
from ..handler import TunnelServiceHandler
from ..proxy import Proxy
from ..raw import RawMessage
from ..reverse import ReverseChannel
from ._admin import AdminServer, bound, listening_socket
from ._logs import event, setup_logging
from ._metrics import CallMeter, TunnelTotals, statistics_of
from ._settings import AGENT_INSTANCE_HEADER, AGENT_KEY_HEADER, check_cluster, tunnel_options
from ._tls import server_context
from ._tokens import TokenFile

if TYPE_CHECKING:
    from ._cluster import Cluster, PeerListener

__all__ = ["Router", "run"]

log = logging.getLogger("grpctunnel.router")

#: Why tunnels close, as the ``reason`` label of the closed-tunnels counter.
CLOSE_REASONS = ("agent", "lost", "replaced", "shutdown")


@dataclass(eq=False)
class TunnelRecord:
    """What the router knows about one registered reverse tunnel."""

    channel: TunnelChannel
    key: str
    instance: str
    peer: str
    grant: str | None
    opened_at: float = field(default_factory=time.time)
    opened_mono: float = field(default_factory=time.monotonic)
    #: Set when the router ends the tunnel: (reason label, words for the log).
    ending: tuple[str, str] | None = None

    def describe(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "peer": self.peer,
            "agent_instance": self.instance,
            "token": self.grant,
            "opened_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(self.opened_at)),
            "age_seconds": round(time.monotonic() - self.opened_mono, 3),
            "draining": self.ending is not None,
            "statistics": statistics_of(self.channel),
        }


def peer_text(peer: Peer | None) -> str:
    address = peer.addr() if peer is not None else None
    if not address:
        return "unknown"
    host, port = address[:2]
    return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"


class Router:
    """The router's state: its tunnels by key, its policy, its metrics."""

    def __init__(self, settings: dict[str, Any], tokens: TokenFile | None) -> None:
        self.settings = settings
        self.tokens = tokens
        self.key_header: str = settings["key_header"]
        self.policy: str = settings["on_duplicate"]
        self.wait_for_tunnel: float = settings["wait_for_tunnel"]
        self.grace: float = settings["grace_period"]
        self.options = tunnel_options(settings)
        self.draining = False
        self.records: dict[TunnelChannel, TunnelRecord] = {}
        self.by_key: dict[str, list[TunnelRecord]] = {}
        self._channels: dict[str, ReverseChannel] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        self.handler = TunnelServiceHandler(
            affinity_key=self._register,
            on_reverse_tunnel_open=self._opened,
            on_reverse_tunnel_close=self._closed,
            options=self.options,
        )
        self.health_status = ServiceStatus()
        self.health_status.set(True)
        drop = () if settings["forward_authorization"] else ("authorization",)
        self.drop = frozenset(drop)
        self.registry = CollectorRegistry(auto_describe=True)
        self.meter = CallMeter(self.registry, "router")
        self.proxy = self.meter.wrap(Proxy(self._choose, drop_metadata=drop))
        #: With --registry: the other routers, and how calls reach them (set by run()).
        self.cluster: Cluster | None = None
        self._local_drop = self.drop
        self.totals = TunnelTotals(
            "router",
            lambda: [statistics_of(r.channel) for r in self.records.values()],
        )
        self.registry.register(self.totals)
        self.registry.register(_OpenTunnels(self))
        self.opened_total = Counter(
            "grpctunnel_router_tunnels_opened", "Agent tunnels registered", registry=self.registry
        )
        self.closed_total = Counter(
            "grpctunnel_router_tunnels_closed",
            "Agent tunnels closed, by why: agent (it closed the tunnel), lost (connection "
            "or keepalive failure), replaced (by a newer tunnel for its key), shutdown",
            ["reason"],
            registry=self.registry,
        )
        self.refused_total = Counter(
            "grpctunnel_router_registrations_refused",
            "Agent registrations refused, by the gRPC status code they got",
            ["code"],
            registry=self.registry,
        )
        for reason in CLOSE_REASONS:
            self.closed_total.labels(reason)
        self.ready_gauge = Gauge(
            "grpctunnel_router_ready",
            "1 while the router takes calls and tunnels",
            registry=self.registry,
        )
        self.ready_gauge.set(1)

    def join(self, cluster: Cluster) -> None:
        """Route through ``cluster`` (before ``server()``)."""
        from ._peers import PEER_HEADERS

        self.cluster = cluster
        # A backend must not forge a peer's refusal, nor see the peers' headers.
        self._local_drop = self.drop | PEER_HEADERS
        self.proxy = self.meter.wrap(cluster.route)

    def server(self) -> grpclib.server.Server:
        server = grpclib.server.Server([self.handler, Health({OVERALL: [self.health_status]})])
        # Callers' calls and agents' tunnels: a few small frames each per
        # call, written together (see tunnel._coalesce).
        _seam.coalesce_writes(server)
        install_fallback(server, self.proxy)
        listen(server, RecvRequest, self._check_request)
        self.meter.listen_on(server)
        return server

    # -- registration ------------------------------------------------------------------

    def _refuse(self, status: Status, message: str, **fields: Any) -> GRPCError:
        self.refused_total.labels(status.name).inc()
        event(
            log,
            "registration_refused",
            "agent registration refused",
            logging.WARNING,
            code=status.name,
            reason=message,
            **fields,
        )
        return GRPCError(status, message)

    async def _check_request(self, request: RecvRequest) -> None:
        """Refuse a registration before its tunnel is negotiated (cheap, early)."""
        if request.method_name != OPEN_REVERSE_TUNNEL:
            return
        metadata = request.metadata
        key = metadata.get(AGENT_KEY_HEADER)
        instance = str(metadata.get(AGENT_INSTANCE_HEADER, ""))
        fields: dict[str, Any] = {"key": key, "peer": peer_text(request.peer), "instance": instance}
        if self.draining:
            raise self._refuse(Status.UNAVAILABLE, "the router is shutting down", **fields)
        if not isinstance(key, str) or not key:
            raise self._refuse(
                Status.INVALID_ARGUMENT,
                f"no {AGENT_KEY_HEADER} header: say which key to register",
                **fields,
            )
        if self.tokens is not None:
            authorization = metadata.get("authorization")
            if not isinstance(authorization, str):
                authorization = ""
            scheme, _, token = authorization.partition(" ")
            if scheme.lower() != "bearer" or not token.strip():
                raise self._refuse(Status.UNAUTHENTICATED, "no bearer token", **fields)
            grant = self.tokens.grant_for(token.strip())
            if grant is None:
                raise self._refuse(Status.UNAUTHENTICATED, "unknown agent token", **fields)
            fields["token"] = grant.name
            if not grant.allows(key):
                raise self._refuse(
                    Status.PERMISSION_DENIED, f"this token may not register key {key!r}", **fields
                )
        if self.policy == "reject" and self._holders(key, instance):
            raise self._refuse(
                Status.ALREADY_EXISTS, f"another agent is registered under key {key!r}", **fields
            )
        # The claim is atomic in the registry; with the registry down, only
        # this router's own tunnels are checked (above).
        registry = self.cluster.registry if self.cluster else None
        if self.policy == "reject" and registry and await registry.claim(key, instance) is False:
            raise self._refuse(
                Status.ALREADY_EXISTS,
                f"another agent is registered under key {key!r} on another router",
                **fields,
            )

    def _holders(self, key: str, instance: str) -> list[TunnelRecord]:
        """The live tunnels of ``key`` from other agent instances."""
        return [
            r
            for r in self.by_key.get(key, ())
            if r.ending is None and not (instance and r.instance == instance)
        ]

    def _register(self, channel: TunnelChannel) -> str:
        """The affinity key of a new tunnel; applies the duplicate policy.

        Synchronous on purpose: nothing runs between this decision and the
        tunnel's insertion into its pool.
        """
        metadata = channel.metadata
        key = str(metadata.get(AGENT_KEY_HEADER, ""))
        instance = str(metadata.get(AGENT_INSTANCE_HEADER, ""))
        peer = peer_text(channel.peer)
        grant = None
        if self.tokens is not None:
            _, _, token = str(metadata.get("authorization", "")).partition(" ")
            found = self.tokens.grant_for(token.strip())
            grant = found.name if found else None
        fields: dict[str, Any] = {"key": key, "peer": peer, "instance": instance}
        if self.draining:
            raise self._refuse(Status.UNAVAILABLE, "the router is shutting down", **fields)
        current = [r for r in self.by_key.get(key, ()) if r.ending is None]
        for record in current:
            if instance and record.instance == instance:
                self._retire(record, "replaced", "replaced by a reconnect of the same agent")
        others = self._holders(key, instance)
        if others and self.policy == "reject":
            raise self._refuse(
                Status.ALREADY_EXISTS, f"another agent is registered under key {key!r}", **fields
            )
        if self.policy == "replace":
            for record in others:
                self._retire(record, "replaced", f"replaced by a newer tunnel from {peer}")
        record = TunnelRecord(channel, key, instance, peer, grant)
        self.records[channel] = record
        self.by_key.setdefault(key, []).append(record)
        return key

    async def _opened(self, channel: TunnelChannel) -> None:
        record = self.records.get(channel)
        if record is None:
            return
        self.opened_total.inc()
        fields: dict[str, Any] = {
            "key": record.key,
            "peer": record.peer,
            "instance": record.instance,
        }
        if record.grant:
            fields["token"] = record.grant
        if self.cluster is not None:
            # Logged once the other routers can find it (or the registry is down).
            registry = self.cluster.registry
            await registry.add(record.key, record.instance)
            fields["registered"] = registry.up
        event(log, "tunnel_opened", "tunnel opened", **fields)

    async def _closed(self, channel: TunnelChannel) -> None:
        record = self.records.pop(channel, None)
        if record is None:
            return  # refused before it was registered
        siblings = self.by_key.get(record.key, [])
        with contextlib.suppress(ValueError):
            siblings.remove(record)
        if not siblings:
            self.by_key.pop(record.key, None)
            self._channels.pop(record.key, None)
        statistics = statistics_of(channel)
        self.totals.retire(statistics)
        if record.ending is not None:
            label, reason = record.ending
        elif channel.end_reason in (None, EndReason.CLOSED, EndReason.PEER_CLOSED):
            label, reason = "agent", "the agent closed the tunnel"
        else:
            label, reason = "lost", str(channel.error) or type(channel.error).__name__
        self.closed_total.labels(label).inc()
        event(
            log,
            "tunnel_closed",
            "tunnel closed",
            key=record.key,
            peer=record.peer,
            instance=record.instance,
            duration_seconds=round(time.monotonic() - record.opened_mono, 3),
            calls=statistics["streams_opened"],
            reason=reason,
        )
        if self.cluster is not None:
            await self.cluster.registry.remove(record.key, record.instance)

    def supersede(self, key: str, instance: str, reason: str) -> None:
        """The registry says another tunnel of ``key`` wins over ``instance``'s here."""
        for record in list(self.by_key.get(key, ())):
            if record.instance == instance:
                self._retire(record, "replaced", reason)

    def _retire(self, record: TunnelRecord, label: str, reason: str) -> None:
        """Take no new calls on this tunnel; close it once its calls are done."""
        if record.ending is not None:
            return
        record.ending = (label, reason)
        record.channel.initiate_shutdown()
        task = asyncio.create_task(self._drain_and_close(record.channel), name="retire tunnel")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _drain_and_close(self, channel: TunnelChannel) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await channel.wait_idle()
        await channel.aclose()

    # -- calls ---------------------------------------------------------------------------

    def call_key(self, metadata: MultiMapping[Any]) -> str:
        """The key a call names; refuses it while draining or without one."""
        if self.draining:
            raise GRPCError(Status.UNAVAILABLE, "the router is shutting down")
        key = metadata.get(self.key_header)
        if not isinstance(key, str) or not key:
            raise GRPCError(
                Status.INVALID_ARGUMENT,
                f"no {self.key_header} header: name the agent the call is for",
            )
        return key

    def local_channel(self, key: str) -> ReverseChannel:
        """The pool of this router's tunnels for ``key`` (kept while it has tunnels)."""
        channel = self._channels.get(key)
        if channel is None:
            channel = self.handler.key_as_channel(key)
            if key in self.by_key:
                self._channels[key] = channel
        return channel

    async def local_proxy(
        self,
        method_name: str,
        stream: grpclib.server.Stream[RawMessage, RawMessage],
        channel: ReverseChannel,
    ) -> None:
        """Forward a call to this router's tunnels (``channel``, from ``local_channel``)."""
        await Proxy(channel, drop_metadata=self._local_drop)(method_name, stream)

    def _choose(
        self, method_name: str, metadata: MultiMapping[Any]
    ) -> grpclib.client.Channel | Any:
        key = self.call_key(metadata)
        channel = self._channels.get(key)
        if channel is None:
            channel = self._channels[key] = self.handler.key_as_channel(key)
        if channel.is_ready():
            return channel
        return self._wait_for(key, channel)

    async def _wait_for(self, key: str, channel: ReverseChannel) -> grpclib.client.Channel:
        # The proxy runs this in the call's handler, which grpclib cancels at
        # the call's deadline: the wait never outlasts it.
        if self.wait_for_tunnel > 0:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(self.wait_for_tunnel):
                    await channel.wait_ready()
        if not channel.is_ready():
            if not self.by_key.get(key):
                self._channels.pop(key, None)
            raise GRPCError(Status.UNAVAILABLE, f"no agent is connected under key {key!r}")
        return channel

    # -- admin ---------------------------------------------------------------------------

    async def ready(self) -> tuple[bool, str]:
        if self.draining:
            return False, "draining: the router is shutting down"
        why = f"ready: {len(self.records)} tunnel(s)"
        if self.cluster is not None:
            # Readiness never depends on the registry: local keys still work.
            registry = self.cluster.registry
            why += "; registry " + ("up" if registry.up else f"down ({registry.error})")
        return True, why

    async def tunnels(self) -> list[dict[str, Any]]:
        local = [record.describe() for record in self.records.values()]
        if self.cluster is None:
            return local
        me = self.cluster.registry.me
        for entry in local:
            entry.update(route="local", router=me.router)
        return local + await self.cluster.remote_tunnels()

    # -- shutdown ------------------------------------------------------------------------

    async def drain(self) -> None:
        """Refuse what is new, let calls in flight finish (bounded), close every tunnel."""
        self.draining = True
        self.health_status.set(False)
        self.ready_gauge.set(0)
        self.handler.initiate_shutdown()
        if self.cluster is not None:
            await self.cluster.registry.withdraw()
        event(
            log,
            "router_draining",
            "router draining",
            calls_in_flight=self.meter.running,
            grace_period_seconds=self.grace,
        )
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.grace):
                await self.meter.wait_idle()
        for record in list(self.records.values()):
            if record.ending is None:
                record.ending = ("shutdown", "the router shut down")
            record.channel.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.close_timeout):
                await asyncio.gather(
                    *(r.channel.wait_closed() for r in list(self.records.values()))
                )


class _OpenTunnels(Collector):
    def __init__(self, router: Router) -> None:
        self._router = router

    def collect(self) -> list[Metric]:
        router = self._router
        return [
            GaugeMetricFamily(
                "grpctunnel_router_tunnels", "Agent tunnels open now", value=len(router.records)
            ),
            GaugeMetricFamily(
                "grpctunnel_router_keys",
                "Keys with at least one agent tunnel",
                value=len(router.by_key),
            ),
        ]


async def run(settings: dict[str, Any]) -> int:
    """Run the router until SIGTERM/SIGINT; return the exit status."""
    check_cluster(settings)
    setup_logging(settings["log_format"], settings["log_level"])
    tls: ssl.SSLContext | None = server_context(
        settings["tls_cert"], settings["tls_key"], settings["tls_client_ca"]
    )
    tokens = None
    if settings["agent_tokens"] is not None:
        tokens = TokenFile.load(settings["agent_tokens"])
    router = Router(settings, tokens)
    peer: PeerListener | None = None
    if settings["registry"] is not None:
        from ._cluster import PeerListener

        # Before our own sockets, so that its usage errors leave none open.
        peer = PeerListener(router, settings)
    grpc_sock = listening_socket(settings["listen"], "--listen")
    admin_sock = listening_socket(settings["admin"], "--admin") if settings["admin"] else None
    server = router.server()
    admin = AdminServer(registry=router.registry, ready=router.ready, tunnels=router.tunnels)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        if peer is not None:
            await peer.start()
        await server.start(sock=grpc_sock, ssl=tls)
        admin_address = await admin.start(admin_sock) if admin_sock else None
        if tokens is None:
            event(
                log,
                "no_agent_tokens",
                "no --agent-tokens: any agent may register any key",
                logging.WARNING,
            )
        cluster_fields: dict[str, Any] = {}
        if router.cluster is not None and peer is not None:
            registry = router.cluster.registry
            cluster_fields = {
                "registry": registry.store.description,
                "router_id": registry.me.router,
                "peer": peer.address,
                "advertise": registry.me.address,
                "registry_ttl_seconds": registry.ttl,
            }
        event(
            log,
            "router_listening",
            "router listening",
            grpc=str(bound(grpc_sock)),
            admin=str(admin_address) if admin_address else None,
            tls=tls is not None,
            on_duplicate=router.policy,
            key_header=router.key_header,
            agent_tokens=len(tokens.grants) if tokens else None,
            **cluster_fields,
        )
        await stop.wait()
        await router.drain()
    finally:
        server.close()
        if peer is not None:
            peer.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(5):
                await server.wait_closed()
                if peer is not None:
                    await peer.wait_closed()
        if router.cluster is not None:
            await router.cluster.aclose()
        await admin.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    event(log, "router_stopped", "router stopped")
    return 0
