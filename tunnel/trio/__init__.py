"""Tunnels for trio programs: open, serve and call them from trio code.

The tunnel's machinery stays asyncio code, run on trio by trio-asyncio
(``open_loop()``, once, around the program).  This module is the trio face of
it: everything here is awaited from trio tasks and obeys trio's
cancellation.  A trio program never touches asyncio::

    import trio, grpclib.client, tunnel.trio

    async def main():
        async with tunnel.trio.open_loop():
            channel = grpclib.client.Channel("127.0.0.1", 50051)
            async with tunnel.trio.open_tunnel(channel) as tunnel_channel:
                reply = await MyServiceStub(tunnel_channel).do_thing(request)
            channel.close()

    trio.run(main)

* Calls.  ``open_tunnel`` and ``TunnelServiceHandler.key_as_channel`` give
  ``grpclib.client.Channel`` objects; generated stubs use them unchanged.
  The calling trio task runs each call itself (no crossing into asyncio per
  call), so a cancel scope or ``fail_after`` around a call cancels it, and
  the peer sees it cancelled.
* Serving.  Handlers passed here (to ``ReverseTunnelServer``,
  ``TunnelServiceHandler``, ``serve``) are trio code: ``trio.sleep``,
  nurseries, cancel scopes and locks work in them.  Each call's handler is
  one trio task.  ``asyncio_handlers(...)`` marks servables that are asyncio
  code (grpclib's Health service, say) to serve them unchanged beside.
* Keyword arguments are the asyncio layer's, passed through unchanged, with
  one rule: a callback given as an ``async def`` is trio code and runs as a
  trio task.

docs/trio.md says why it is built this way, with measurements.
"""

from __future__ import annotations

import inspect
import socket
from collections.abc import Collection, Generator, Hashable
from typing import Any

import grpclib.client
import grpclib.server
import trio
from multidict import MultiDict

from .. import _seam
from .. import channel as _aio_channel
from .. import device as _aio_device
from .. import handler as _aio_handler
from .._typing import Servable
from ._bridge import CANCEL_GRACE, asyncio_args, asyncio_kwargs, await_asyncio, hop, require_loop
from ._channels import (
    ReconnectingTunnelChannel,
    ReverseChannel,
    TunnelChannel,
    asyncio_channel,
)
from ._handlers import asyncio_handlers, trio_fallback, trio_handlers
from ._loop import open_loop

__all__ = [
    "ReconnectingTunnelChannel",
    "ReverseChannel",
    "ReverseTunnelServer",
    "TunnelChannel",
    "TunnelServiceHandler",
    "asyncio_handlers",
    "open_loop",
    "open_tunnel",
    "serve",
]


# -- forward tunnels: the network client --------------------------------------------------


class _OpenTunnel:
    """``open_tunnel(...)``: awaitable, and an async context manager."""

    def __init__(self, channel: grpclib.client.Channel, kwargs: dict[str, Any]) -> None:
        self._channel = asyncio_channel(channel)
        self._kwargs = kwargs
        self._opened: TunnelChannel | None = None

    async def _open(self) -> TunnelChannel:
        async def open_in_asyncio() -> _aio_channel.TunnelChannel:
            return await _aio_channel.open_tunnel(self._channel, **self._kwargs)

        self._opened = TunnelChannel(await hop(open_in_asyncio))
        return self._opened

    def __await__(self) -> Generator[Any, None, TunnelChannel]:
        return self._open().__await__()

    async def __aenter__(self) -> TunnelChannel:
        return await self._open()

    async def __aexit__(self, *exc_info: object) -> None:
        if self._opened is not None:
            await self._opened.aclose()


def open_tunnel(channel: grpclib.client.Channel, **kwargs: Any) -> _OpenTunnel:
    """Open a forward tunnel over ``channel``: ``tunnel.open_tunnel`` for trio.

    ``async with open_tunnel(ch) as tunnel_channel:`` or ``await
    open_tunnel(ch)`` (then ``aclose()`` it).  ``channel`` is a grpclib
    ``Channel`` (made inside ``open_loop()``) or a trio ``TunnelChannel``
    (tunnels nest); keyword arguments (``metadata``, ``options``, ...) are
    ``tunnel.open_tunnel``'s.  Failures raise as there: the carrying call's
    ``GRPCError``, ``NegotiationError``.
    """
    return _OpenTunnel(channel, asyncio_kwargs(kwargs))


# -- reverse tunnels: the device --------------------------------------------------------


class ReverseTunnelServer:
    """Serves trio handlers to a network server over reverse tunnels.

    ``tunnel.ReverseTunnelServer`` for trio: ``handlers`` are trio code;
    keyword arguments are passed through.  ``aio`` is the asyncio server
    underneath (listen to its server events there).
    """

    def __init__(
        self, channel: grpclib.client.Channel, handlers: Collection[Any], **kwargs: Any
    ) -> None:
        self.aio = _aio_device.ReverseTunnelServer(
            asyncio_channel(channel), trio_handlers(handlers), **_server_kwargs(kwargs)
        )

    @property
    def closed(self) -> bool:
        return self.aio.closed

    @property
    def response_metadata(self) -> MultiDict[Any] | None:
        """The response headers of the most recently opened tunnel."""
        return self.aio.response_metadata

    async def serve(self, *args: Any, **kwargs: Any) -> None:
        """Open one reverse tunnel and serve it until it closes.

        As ``tunnel.ReverseTunnelServer.serve``.  Cancelling the caller ends
        this tunnel (calls in flight on it are cancelled) and returns once
        it is over.
        """
        await await_asyncio(self.aio.serve(*asyncio_args(args), **asyncio_kwargs(kwargs)))

    async def serve_forever(self, *args: Any, **kwargs: Any) -> None:
        """Keep a reverse tunnel open, reconnecting, until ``close()`` or a cancel.

        As ``tunnel.ReverseTunnelServer.serve_forever``.  Cancelling the
        caller (the nursery running the device, Ctrl-C) closes the server:
        the tunnel ends as ``close()`` ends it, and this returns once it is
        over, within the tunnel's close bound.
        """
        await await_asyncio(
            self.aio.serve_forever(*asyncio_args(args), **asyncio_kwargs(kwargs)),
            stop=self.aio.close,
        )

    def close(self) -> None:
        """End every tunnel now; calls in flight are cancelled."""
        self.aio.close()

    async def graceful_stop(self) -> None:
        """Refuse new streams (UNAVAILABLE), wait for running calls, then close."""
        await hop(self.aio.graceful_stop)

    async def wait_closed(self) -> None:
        """Wait until every ``serve()`` has returned."""
        await hop(self.aio.wait_closed)


def _server_kwargs(kwargs: dict[str, Any]) -> dict[str, Any]:
    """Keyword arguments of a serving class for the asyncio layer.

    A ``fallback`` written as an ``async def`` function is a trio handler
    (``Proxy`` and other objects are asyncio code and pass unchanged);
    other async functions are trio callbacks.
    """
    fallback = kwargs.get("fallback")
    bridged = asyncio_kwargs(kwargs)
    if inspect.iscoroutinefunction(fallback):
        bridged["fallback"] = trio_fallback(fallback)
    return bridged


def _listening_socket(host: str | None, port: int | None) -> socket.socket:
    """A bound TCP socket; IPPROTO_TCP so that asyncio sets TCP_NODELAY on accepts."""
    family = socket.AF_INET6 if host and ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((host or "", port or 0))
    except BaseException:
        sock.close()
        raise
    return sock


# -- the network server -------------------------------------------------------------


class TunnelServiceHandler:
    """``grpctunnel.v1.TunnelService`` with trio handlers, and reverse pools for trio.

    ``tunnel.TunnelServiceHandler`` for trio: ``handlers`` (served over
    forward tunnels) are trio code; keyword arguments are passed through.
    Put it in ``serve([...])`` (or, as ``aio_servable``, in a grpclib
    ``Server``).
    """

    def __init__(self, handlers: Collection[Any] = (), **kwargs: Any) -> None:
        self.aio = _aio_handler.TunnelServiceHandler(
            trio_handlers(handlers), **_server_kwargs(kwargs)
        )

    @property
    def aio_servable(self) -> Servable:
        """What a grpclib ``Server`` takes: the asyncio handler itself."""
        return self.aio

    def __mapping__(self) -> Any:
        return self.aio.__mapping__()

    def initiate_shutdown(self) -> None:
        """Every tunnel refuses new streams with UNAVAILABLE; running calls finish."""
        self.aio.initiate_shutdown()

    def as_channel(self) -> ReverseChannel:
        """All reverse tunnels as one channel (round-robin)."""
        return ReverseChannel(self.aio.as_channel())

    def key_as_channel(self, key: Hashable) -> ReverseChannel:
        """The reverse tunnels with affinity ``key`` as one channel."""
        return ReverseChannel(self.aio.key_as_channel(key))

    def all_reverse_tunnels(self) -> list[TunnelChannel]:
        """A snapshot of the open reverse tunnels."""
        return [TunnelChannel(channel) for channel in self.aio.all_reverse_tunnels()]


async def serve(
    handlers: Collection[Any],
    host: str = "127.0.0.1",
    port: int = 0,
    *,
    task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
    **start_kwargs: Any,
) -> None:
    """Run a grpclib server for ``handlers`` until cancelled: ``nursery.start(serve, ...)``.

    ``handlers`` are trio code, except this module's ``TunnelServiceHandler``
    and ``asyncio_handlers(...)``.  Reports the port it listens on to
    ``task_status``; keyword arguments go to ``grpclib.server.Server.start``
    (``ssl``, ``sock``, ...).  When cancelled it stops the server as a process
    exit would: it stops listening, cancels running handlers and drops the
    connections (peers see them lost: UNAVAILABLE, and devices reconnect),
    then waits, shielded and bounded, until the server is closed.
    """
    require_loop()
    server = grpclib.server.Server(trio_handlers(handlers))
    connections = _seam.record_connections(server)
    sock = start_kwargs.pop("sock", None)
    own_sock = sock is None
    if own_sock:
        sock = _listening_socket(host, port)
    try:
        await hop(server.start, sock=sock, **start_kwargs)
    except BaseException:
        if own_sock:
            sock.close()
        raise
    try:
        task_status.started(sock.getsockname()[1])
        await trio.sleep_forever()
    finally:
        # As a process exit would: grpclib's close() alone leaves accepted
        # connections open, answering calls for a server that stopped.
        server.close()
        _seam.drop_connections(connections)
        with trio.CancelScope(shield=True), trio.move_on_after(CANCEL_GRACE):
            await hop(server.wait_closed)
            # Their sockets are closed by asyncio, which stops with the loop.
            await hop(connections.wait_closed)
