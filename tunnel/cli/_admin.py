"""The admin HTTP port of the router and the agent (aiohttp).

* ``/healthz``: 200 while the process runs its event loop (alive).
* ``/readyz``: 200 when the program says it is ready, else 503; the body
  says why in one line.
* ``/metrics``: the Prometheus text format, from the program's own
  registry (prometheus-client writes it).
* ``/tunnels``: JSON, what the program reports about its tunnels (a
  function, or a coroutine function: the router asks its registry).

The admin port is separate from the gRPC port (as konnectivity does), so
that it can stay on a private interface while the gRPC port faces agents
and callers.  It has no authentication: bind it to loopback or a private
network.
"""

from __future__ import annotations

import inspect
import json
import socket
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from ._config import Address, UsageError

__all__ = ["AdminServer", "listening_socket"]

#: ``ready()`` -> (ready, why): why is shown in /readyz's body.
ReadyCheck = Callable[[], Awaitable[tuple[bool, str]]]


def listening_socket(address: Address, what: str) -> socket.socket:
    """A socket bound to ``address``; a bad or busy address is a ``UsageError``.

    IPPROTO_TCP, not the default 0: asyncio sets TCP_NODELAY on accepted
    connections only for a socket that says TCP explicitly, and a gRPC
    server without it waits on delayed ACKs.
    """
    try:
        infos = socket.getaddrinfo(
            address.host, address.port, type=socket.SOCK_STREAM, proto=socket.IPPROTO_TCP
        )
    except socket.gaierror as exc:
        raise UsageError(f"{what} {address}: {exc.strerror}") from None
    family, kind, proto, _, sockaddr = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(sockaddr)
    except OSError as exc:
        sock.close()
        raise UsageError(f"{what} {address}: {exc.strerror or exc}") from None
    return sock


def bound(sock: socket.socket) -> Address:
    host, port = sock.getsockname()[:2]
    return Address(host, port)


class AdminServer:
    """The four endpoints, served on one socket until ``stop()``."""

    def __init__(
        self,
        *,
        registry: CollectorRegistry,
        ready: ReadyCheck,
        tunnels: Callable[[], Any],
    ) -> None:
        self._registry = registry
        self._ready = ready
        self._tunnels = tunnels
        app = web.Application()
        app.router.add_get("/healthz", self._healthz)
        app.router.add_get("/readyz", self._readyz)
        app.router.add_get("/metrics", self._metrics)
        app.router.add_get("/tunnels", self._tunnels_page)
        # The runner, not the site, holds the shutdown timeout (aiohttp 3.9
        # deprecated the site's).
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)

    async def start(self, sock: socket.socket) -> Address:
        await self._runner.setup()
        site = web.SockSite(self._runner, sock)
        await site.start()
        return bound(sock)

    async def stop(self) -> None:
        await self._runner.cleanup()

    async def _healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def _readyz(self, request: web.Request) -> web.Response:
        ready, why = await self._ready()
        return web.Response(status=200 if ready else 503, text=why + "\n")

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self._registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _tunnels_page(self, request: web.Request) -> web.Response:
        tunnels = self._tunnels()
        if inspect.isawaitable(tunnels):
            tunnels = await tunnels
        text = json.dumps(tunnels, indent=1, default=str) + "\n"
        return web.Response(text=text, content_type="application/json")
