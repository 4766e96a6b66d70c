"""``grpctunnel agent``: registers with routers and forwards their calls to a backend.

For each ``--router`` the agent keeps one reverse tunnel open
(``ReverseTunnelServer.serve_forever``: reconnects with backoff and jitter
that starts over after a stable period) and registers under ``--key`` with
three request headers: ``authorization: Bearer TOKEN`` (from
``--token-file`` or ``$GRPCTUNNEL_TOKEN``, read anew for every attempt so a
rotated token is picked up), ``grpctunnel-agent-key`` and
``grpctunnel-agent-instance`` (random per process: the router tells a
reconnect of this agent from another agent claiming the key).

Every call that arrives through a tunnel goes to ``--backend`` through a
``tunnel.Proxy``; with ``--allow-method`` only matching methods do, the
others end with PERMISSION_DENIED without reaching the backend.

A refusal that retrying will not cure (UNAUTHENTICATED, PERMISSION_DENIED,
UNIMPLEMENTED, three times in a row) stops the agent with one line naming
the router and exit status 1.  ALREADY_EXISTS (a router under
``--on-duplicate reject`` whose key another agent holds) is retried with
backoff: this agent stands by and takes over when the other goes away.

Shutdown (SIGTERM/SIGINT): each tunnel refuses new calls, calls in flight
get up to ``--grace-period`` to finish, then the tunnels close, exit 0.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import signal
import time
import uuid
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import grpclib.client
import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from .. import _seam
from ..device import ReverseTunnelServer
from ..fallback import Fallback
from ..proxy import Proxy
from ..raw import RawMessage
from ._admin import AdminServer, listening_socket
from ._config import Address, read_secret
from ._logs import context_fields, event, setup_logging
from ._metrics import CallMeter, TunnelTotals
from ._settings import AGENT_INSTANCE_HEADER, AGENT_KEY_HEADER, tunnel_options
from ._tls import client_context

__all__ = ["Agent", "run"]

log = logging.getLogger("grpctunnel.agent")

TOKEN_ENV = "GRPCTUNNEL_TOKEN"
#: How long /readyz waits for the backend's answer.
BACKEND_CHECK_TIMEOUT = 1.0


def device_statistics(device: ReverseTunnelServer) -> list[dict[str, Any]]:
    """The statistics of a device's open tunnels."""
    return [dataclasses.asdict(s) for s in device.statistics()]


class RouterLink:
    """One router this agent registers with, and its tunnel's state."""

    def __init__(
        self, address: Address, device: ReverseTunnelServer, channel: grpclib.client.Channel
    ) -> None:
        self.address = address
        self.device = device
        self.channel = channel
        self.connected_since: float | None = None
        self.connects = 0
        self.last_drop: str | None = None

    def describe(self) -> dict[str, Any]:
        since = self.connected_since
        return {
            "router": str(self.address),
            "connected": since is not None,
            "connected_since": None
            if since is None
            else time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(since)),
            "connects": self.connects,
            "last_disconnect_reason": self.last_drop,
            "statistics": device_statistics(self.device),
        }


class Agent:
    def __init__(self, settings: dict[str, Any]) -> None:
        self.settings = settings
        self.key: str = settings["key"]
        self.instance = uuid.uuid4().hex[:16]
        self.token_file: Path | None = settings["token_file"]
        self.token = read_secret(self.token_file, TOKEN_ENV, "--token-file")
        self.allowed: list[str] = settings["allow_method"]
        backend: Address = settings["backend"]
        self.backend = grpclib.client.Channel(backend.host, backend.port)
        # The calls to the backend and the tunnels to the routers: a few
        # small frames each per call, written together (see tunnel._coalesce).
        _seam.coalesce_writes(self.backend)
        tls = client_context(
            settings["tls"], settings["tls_ca"], settings["tls_cert"], settings["tls_key"]
        )
        options = tunnel_options(
            settings, max_concurrent_streams=settings["max_concurrent_streams"]
        )
        self.registry = CollectorRegistry(auto_describe=True)
        self.meter = CallMeter(self.registry, "agent")
        proxy = Proxy(self.backend)
        fallback: Fallback = proxy if not self.allowed else self._only_allowed(proxy)
        metered = self.meter.wrap(fallback)
        self.links: list[RouterLink] = []
        for address in settings["router"]:
            channel = grpclib.client.Channel(address.host, address.port, ssl=tls)
            _seam.coalesce_writes(channel)
            device = ReverseTunnelServer(channel, [], options=options, fallback=metered)
            self.meter.listen_on(device)
            self.links.append(RouterLink(address, device, channel))
        # Counters add each ended tunnel's last statistics (``disconnected``).
        self.totals = TunnelTotals(
            "agent",
            lambda: [s for link in self.links for s in device_statistics(link.device)],
        )
        self.registry.register(self.totals)
        self.registry.register(_Connected(self))
        self.connects_total = Counter(
            "grpctunnel_agent_connects", "Tunnels opened to a router", registry=self.registry
        )
        self.disconnects_total = Counter(
            "grpctunnel_agent_disconnects", "Tunnels to a router that ended", registry=self.registry
        )

    def _only_allowed(self, proxy: Proxy) -> Fallback:
        allowed = self.allowed

        async def only_allowed(
            method_name: str, stream: grpclib.server.Stream[RawMessage, RawMessage]
        ) -> None:
            if not any(fnmatchcase(method_name, pattern) for pattern in allowed):
                raise GRPCError(
                    Status.PERMISSION_DENIED, f"this agent does not forward {method_name}"
                )
            await proxy(method_name, stream)

        return only_allowed

    def _metadata(self) -> dict[str, str]:
        if self.token_file is not None:
            # Read anew each time: a rotated token is used on the next attempt.
            with contextlib.suppress(Exception):
                self.token = read_secret(self.token_file, TOKEN_ENV, "--token-file")
        metadata = {AGENT_KEY_HEADER: self.key, AGENT_INSTANCE_HEADER: self.instance}
        if self.token:
            metadata["authorization"] = f"Bearer {self.token}"
        return metadata

    async def serve(self, link: RouterLink) -> None:
        """Keep a tunnel to one router until stopped; raise a permanent refusal."""
        context_fields.set({"router": str(link.address), "key": self.key})
        settings = self.settings

        def connected() -> None:
            link.connected_since = time.time()
            link.connects += 1
            self.connects_total.inc()

        def disconnected(reason: str) -> None:
            link.connected_since = None
            link.last_drop = reason
            self.disconnects_total.inc()
            last = link.device.last_statistics
            if last is not None:
                self.totals.retire(dataclasses.asdict(last))

        await link.device.serve_forever(
            self._metadata,
            min_backoff=settings["min_backoff"],
            max_backoff=max(settings["max_backoff"], settings["min_backoff"]),
            on_connected=connected,
            on_disconnected=disconnected,
        )

    async def ready(self) -> tuple[bool, str]:
        up = [link for link in self.links if link.connected_since is not None]
        if not up:
            return False, "no tunnel to any router"
        answered, why = await self.backend_answers()
        if not answered:
            return False, why
        return True, f"ready: {len(up)} of {len(self.links)} router(s) connected; {why}"

    async def backend_answers(self) -> tuple[bool, str]:
        """Ask the backend's grpc.health.v1 Check (overall); UNIMPLEMENTED counts as up."""
        try:
            reply = await HealthStub(self.backend).Check(
                HealthCheckRequest(), timeout=BACKEND_CHECK_TIMEOUT
            )
        except GRPCError as exc:
            if exc.status is Status.UNIMPLEMENTED:
                return True, "the backend answers (it has no health service)"
            return (
                False,
                f"the backend's health check failed: {exc.status.name} {exc.message or ''}",
            )
        except (OSError, TimeoutError) as exc:
            return False, f"the backend does not answer: {type(exc).__name__} {exc}".rstrip()
        if reply.status != HealthCheckResponse.SERVING:
            name = HealthCheckResponse.ServingStatus.Name(reply.status)
            return False, f"the backend reports {name}"
        return True, "the backend is SERVING"

    def tunnels(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "agent_instance": self.instance,
            "backend": str(self.settings["backend"]),
            "routers": [link.describe() for link in self.links],
        }

    async def stop(self, grace: float) -> None:
        """New calls refused; calls in flight finish (bounded); tunnels closed."""
        event(log, "agent_draining", "agent draining", calls_in_flight=self.meter.running)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(grace):
                await asyncio.gather(*(link.device.graceful_stop() for link in self.links))
        for link in self.links:
            link.device.close()

    def close_channels(self) -> None:
        for link in self.links:
            link.channel.close()
        self.backend.close()


class _Connected(Collector):
    def __init__(self, agent: Agent) -> None:
        self._agent = agent

    def collect(self) -> list[Metric]:
        up = sum(1 for link in self._agent.links if link.connected_since is not None)
        return [
            GaugeMetricFamily(
                "grpctunnel_agent_tunnels", "Routers this agent has a tunnel to now", value=up
            ),
            GaugeMetricFamily(
                "grpctunnel_agent_routers",
                "Routers this agent registers with",
                value=len(self._agent.links),
            ),
        ]


async def run(settings: dict[str, Any]) -> int:
    """Run the agent until SIGTERM/SIGINT (0) or a permanent refusal (1)."""
    setup_logging(settings["log_format"], settings["log_level"])
    admin_sock = listening_socket(settings["admin"], "--admin") if settings["admin"] else None
    agent = Agent(settings)
    admin = AdminServer(registry=agent.registry, ready=agent.ready, tunnels=agent.tunnels)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    serving = [
        asyncio.create_task(agent.serve(link), name=f"agent -> {link.address}")
        for link in agent.links
    ]
    stopping = asyncio.create_task(stop.wait(), name="agent stop")
    status = 0
    try:
        admin_address = await admin.start(admin_sock) if admin_sock else None
        event(
            log,
            "agent_started",
            "agent started",
            key=agent.key,
            instance=agent.instance,
            routers=[str(link.address) for link in agent.links],
            backend=str(settings["backend"]),
            admin=str(admin_address) if admin_address else None,
            token=agent.token is not None,
        )
        if agent.token is None:
            event(
                log,
                "no_token",
                "no --token-file or $GRPCTUNNEL_TOKEN: registering without a token",
                logging.WARNING,
            )
        await asyncio.wait([stopping, *serving], return_when=asyncio.FIRST_COMPLETED)
        refused = next(
            (t for t in serving if t.done() and not t.cancelled() and t.exception()), None
        )
        if refused is not None:
            error = refused.exception()
            link = agent.links[serving.index(refused)]
            what = (
                f"{error.status.name}: {error.message}"
                if isinstance(error, GRPCError)
                else repr(error)
            )
            event(
                log,
                "agent_refused",
                f"router {link.address} refused the agent for good ({what}); stopping",
                logging.ERROR,
                router=str(link.address),
            )
            status = 1
        await agent.stop(settings["grace_period"] if status == 0 else 0.0)
    finally:
        stopping.cancel()
        for task in serving:
            task.cancel()
        await asyncio.gather(stopping, *serving, return_exceptions=True)
        agent.close_channels()
        await admin.stop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.remove_signal_handler(signum)
    event(log, "agent_stopped", "agent stopped", exit_status=status)
    return status
