"""Router replicas: where a call goes when its key may be on another router.

With ``--registry``, a router routes each call (``Cluster.route``, the
fallback of its gRPC port) in this order:

1. its own tunnels, when it holds the key (route ``local``);
2. a call that was forwarded already (it carries ``grpctunnel-forwarded-by``)
   goes nowhere else: it is refused at once (``_peers.refuse``) and its
   router tries another candidate;
3. the routers the registry names for the key, one after the other, until
   one takes the call (route ``peer``); a refusal or an unreachable peer
   costs no message (``_peers.Replaying``);
4. with none, it waits up to ``--wait-for-tunnel`` (within the call's
   deadline) for the key to appear, here (the tunnel pool) or anywhere (the
   registry's notice), and starts over; then UNAVAILABLE (route ``none``).

The registry being unreachable stops only step 3: the call waits for a
tunnel here, then fails with UNAVAILABLE naming the registry.

The peer listener (``Cluster.serve_peer``) serves forwarded calls from this
router's tunnels only, and refuses the others at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from typing import TYPE_CHECKING, Any

import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from multidict import MultiDict
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..raw import RawMessage
from ..reverse import ReverseChannel
from ._admin import bound, listening_socket
from ._config import Address, UsageError, read_secret
from ._peers import (
    PeerChannels,
    PeerRefused,
    Replaying,
    is_forwarded,
    peer_metadata,
    peer_server,
    refuse,
)
from ._registry import Holder, Registry, RegistryError, Store
from ._settings import PEER_SECRET_ENV, REGISTRY_PASSWORD_ENV
from ._tls import client_context, server_context

if TYPE_CHECKING:
    from .router import Router

__all__ = ["ROUTES", "Cluster", "PeerListener"]

log = logging.getLogger("grpctunnel.router")

#: The ``route`` label: served by a tunnel here, forwarded to a peer, or nowhere.
ROUTES = ("local", "peer", "none")
#: The ``result`` label of a forward: the peer took the call, refused it
#: (it no longer holds the key), could not be reached, or the attempt failed.
FORWARD_RESULTS = ("forwarded", "refused", "unreachable", "error")
REGISTRY_OPERATIONS = ("ping", "hold", "claim", "release", "refresh", "reindex", "lookup",
                       "holders", "withdraw")  # fmt: skip

Stream = grpclib.server.Stream[RawMessage, RawMessage]


class Cluster:
    """The registry, the peer channels and the routing of one router."""

    def __init__(
        self,
        router: Router,
        store: Store,
        me: Holder,
        ttl: float,
        peers: PeerChannels,
        secret: str | None,
        metrics: CollectorRegistry,
    ) -> None:
        self.router = router
        self.registry = Registry(
            store,
            me,
            ttl=ttl,
            policy=router.policy,
            on_superseded=router.supersede,
            observe=self.observe,
        )
        self.peers = peers
        self.secret = secret
        self.routes = Counter(
            "grpctunnel_router_calls_by_route",
            "Calls by where they went: local (a tunnel here), peer (forwarded to the router "
            "that holds the key), none (no router holds it)",
            ["route"],
            registry=metrics,
        )
        self.forwards = Counter(
            "grpctunnel_router_peer_forwards",
            "Attempts to forward a call to a peer router, by result: forwarded (it took the "
            "call), refused (it no longer holds the key), unreachable, error",
            ["result"],
            registry=metrics,
        )
        self.latency = Histogram(
            "grpctunnel_router_registry_operation_seconds",
            "Seconds one registry operation took",
            ["operation"],
            registry=metrics,
            buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 2.5),
        )
        for route in ROUTES:
            self.routes.labels(route)
        for result in FORWARD_RESULTS:
            self.forwards.labels(result)
        for operation in REGISTRY_OPERATIONS:
            self.latency.labels(operation)
        metrics.register(_RegistryUp(self.registry))

    def observe(self, operation: str, seconds: float) -> None:
        self.latency.labels(operation).observe(seconds)

    # -- the gRPC port -------------------------------------------------------------------

    async def route(self, method_name: str, stream: Stream) -> None:
        router = self.router
        metadata: MultiDict[Any] = stream.metadata or MultiDict()
        key = router.call_key(metadata)
        local = router.local_channel(key)
        if local.is_ready():
            self.routes.labels("local").inc()
            await router.local_proxy(method_name, stream, local)
            return
        if is_forwarded(metadata):
            self.routes.labels("none").inc()
            await refuse(stream, self.registry.me.router, key, "not held")
            return
        replaying = Replaying(stream)
        try:
            await self._find(method_name, replaying, key, local)
        finally:
            await replaying.aclose()

    async def _find(
        self, method_name: str, replaying: Replaying, key: str, local: ReverseChannel
    ) -> None:
        router = self.router
        caller = MultiDict(replaying.metadata)
        forwarded = peer_metadata(caller, self.registry.me.router, self.secret)
        loop = asyncio.get_running_loop()
        # grpclib cancels this handler at the call's deadline: no wait outlasts it.
        give_up = loop.time() + router.wait_for_tunnel
        failure: str | None = None
        with self.registry.watch(key) as appeared:
            while True:
                appeared.clear()
                if local.is_ready():
                    self.routes.labels("local").inc()
                    replaying.rewind(caller, peer=False)
                    await router.local_proxy(method_name, replaying.stream, local)
                    return
                try:
                    candidates = await self.registry.lookup(key)
                    failure = None
                except RegistryError as exc:
                    candidates, failure = [], str(exc)
                for holder in candidates:
                    if await self._attempt(method_name, replaying, forwarded, holder):
                        self.routes.labels("peer").inc()
                        return
                left = give_up - loop.time()
                if left <= 0 or replaying.committed:
                    break
                await _first(left, local.wait_ready(), appeared.wait())
        self.routes.labels("none").inc()
        if failure is not None:
            raise GRPCError(Status.UNAVAILABLE, f"key {key!r} is not held here, and {failure}")
        raise GRPCError(Status.UNAVAILABLE, f"no agent is connected under key {key!r}")

    async def _attempt(
        self, method_name: str, replaying: Replaying, metadata: MultiDict[Any], holder: Holder
    ) -> bool:
        """Forward the call to ``holder``; False if it did not take it (try another)."""
        replaying.rewind(metadata, peer=True)
        proxy = self.peers.proxy(holder.address)
        try:
            await proxy(method_name, replaying.stream)
        except PeerRefused as refusal:
            self.forwards.labels(refusal.result).inc()
            log.debug("peer %s did not take the call: %s", holder.router, refusal)
            return False
        except Exception:
            self.forwards.labels("error").inc()
            raise
        self.forwards.labels("forwarded").inc()
        return True

    # -- the peer listener ---------------------------------------------------------------

    async def serve_peer(self, method_name: str, stream: Stream) -> None:
        """A call forwarded by a peer: from a tunnel here, or refused at once."""
        router = self.router
        metadata: MultiDict[Any] = stream.metadata or MultiDict()
        me = self.registry.me.router
        if router.draining:
            self.routes.labels("none").inc()
            await refuse(stream, me, str(metadata.get(router.key_header, "")), "draining")
            return
        key = router.call_key(metadata)
        local = router.local_channel(key)
        if not local.is_ready():
            self.routes.labels("none").inc()
            await refuse(stream, me, key, "not held")
            return
        self.routes.labels("local").inc()
        await router.local_proxy(method_name, stream, local)

    # -- admin ---------------------------------------------------------------------------

    async def remote_tunnels(self) -> list[dict[str, Any]]:
        """``/tunnels`` entries for the keys other routers hold (none while down)."""
        try:
            found = await self.registry.remote_holders()
        except RegistryError:
            return []
        return [
            {"key": key, "route": "remote", "router": holder.router, "address": holder.address}
            for holder, keys in sorted(found.items(), key=lambda item: item[0].router)
            for key in keys
        ]

    async def aclose(self) -> None:
        await self.registry.aclose()
        self.peers.close()


async def _first(timeout: float, *waits: Any) -> None:
    """Return when the first of ``waits`` (coroutines) returns, or after ``timeout``."""
    tasks = [asyncio.ensure_future(wait) for wait in waits]
    try:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class _RegistryUp(Collector):
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    def collect(self) -> list[Metric]:
        return [
            GaugeMetricFamily(
                "grpctunnel_router_registry_up",
                "1 while the registry answers, 0 while it is unreachable",
                value=1 if self._registry.up else 0,
            )
        ]


class PeerListener:
    """The peer listener (``--peer-listen``) and the router's cluster, from the settings.

    Every setting is checked here, before anything starts: a bad address,
    secret or certificate is a usage error (exit status 2).
    """

    def __init__(self, router: Router, settings: dict[str, Any]) -> None:
        try:
            from ._redis import RedisStore
        except ModuleNotFoundError as exc:
            raise UsageError(
                f"--registry needs redis-py ({exc.name}): pip install 'grpclib-tunnel[router]'"
            ) from None

        secret = read_secret(settings["peer_secret_file"], PEER_SECRET_ENV, "--peer-secret-file")
        cert, key, ca = settings["peer_tls_cert"], settings["peer_tls_key"], settings["peer_tls_ca"]
        if secret is None and cert is None:
            raise UsageError(
                "--registry needs the routers to authenticate each other: "
                f"--peer-secret-file (or ${PEER_SECRET_ENV}), or --peer-tls-cert/-key/-ca"
            )
        self._tls = server_context(cert, key, ca, flags="--peer-tls")
        client_tls = client_context(bool(cert), ca, cert, key, flags="--peer-tls")
        self._sock = listening_socket(settings["peer_listen"], "--peer-listen")
        self.address = bound(self._sock)
        advertise = settings["advertise"]
        if advertise is None:
            if self.address.host in ("0.0.0.0", "::"):
                self._sock.close()  # a usage error leaves no socket open
                raise UsageError(
                    f"--peer-listen {settings['peer_listen']}: say which address the other "
                    "routers dial, with --advertise HOST:PORT"
                )
            advertise = self.address
        elif advertise.port == 0:
            advertise = Address(advertise.host, self.address.port)
        store = RedisStore.from_url(
            settings["registry"], password=os.environ.get(REGISTRY_PASSWORD_ENV) or None
        )
        cluster = Cluster(
            router,
            store,
            Holder(settings["router_id"], str(advertise)),
            settings["registry_ttl"],
            PeerChannels(client_tls, router.drop),
            secret,
            router.registry,
        )
        router.join(cluster)
        self.cluster = cluster
        self._server = peer_server(router.meter.wrap(cluster.serve_peer), secret)
        router.meter.listen_on(self._server)

    async def start(self) -> None:
        await self._server.start(sock=self._sock, ssl=self._tls)
        self.cluster.registry.start()

    def close(self) -> None:
        self._server.close()

    async def wait_closed(self) -> None:
        await self._server.wait_closed()
