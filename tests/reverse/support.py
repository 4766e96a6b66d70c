"""Helpers of the reverse-tunnel tests: a network server, devices, a device service.

The tests play both ends in one process: a grpclib ``Server`` with a
``TunnelServiceHandler`` is the network server (the "router"), and
``ReverseTunnelServer`` instances dialing into it are the "devices".
Everything is opened with ``async with`` in the test's own task and closed
before the autouse leak check runs.

Devices register under the affinity key they send in the ``x-key``
request header (``key_from_metadata``), so a test waits for a particular
device with ``handler.key_as_channel(name).wait_ready()``, no polling.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import AsyncIterator, Hashable, Iterable
from dataclasses import dataclass, field
from typing import Any, TypedDict

import grpclib.client
import grpclib.config
import grpclib.events
import grpclib.server

import tunnel
from tunnel import _seam
from tunnel.testing._pb.grpchantesting import Message, TestServiceBase, TestServiceStub

#: Upper bound of one test's body.
TEST_TIMEOUT = 20.0
#: What "at once" / "promptly" means in these tests.
PROMPT = 2.0

KEY_HEADER = "x-key"


class Backoff(TypedDict, total=False):
    """Backoff settings of ``serve_forever`` and ``ReconnectingTunnelChannel``, as keywords."""

    min_backoff: float
    max_backoff: float
    jitter: float


def key_from_metadata(channel: tunnel.TunnelChannel) -> Hashable:
    """The affinity key a device asks for in its ``x-key`` header."""
    return channel.metadata.get(KEY_HEADER)


class Device(TestServiceBase):
    """A device's service: ``unary`` answers with the device's name.

    A request with payload ``b"block"`` waits until ``release`` is set (or
    the call is cancelled, which ``cancelled`` records).  ``infos`` holds the
    ``current_tunnel()`` each call saw.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.started = asyncio.Event()
        self.release = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.infos: list[tunnel.TunnelInfo | None] = []

    async def unary(self, message: Message) -> Message:
        self.infos.append(tunnel.current_tunnel())
        if message.payload == b"block":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        return Message(payload=self.name.encode())

    async def server_stream(self, message: Message) -> AsyncIterator[Message]:
        """The device's name, then (for ``b"block"``) nothing until cancelled.

        A caller that received the name knows the call reached the handler.
        """
        yield Message(payload=self.name.encode())
        if message.payload == b"block":
            self.started.set()
            try:
                await self.release.wait()
            except asyncio.CancelledError:
                self.cancelled.set()
                raise


async def who(channel: grpclib.client.Channel, payload: bytes = b"who") -> str:
    """Ask whichever device *channel* reaches for its name."""
    reply = await TestServiceStub(channel).unary(Message(payload=payload))
    return reply.payload.decode()


# -- the network server --------------------------------------------------------------


@dataclass
class Router:
    server: grpclib.server.Server
    handler: tunnel.TunnelServiceHandler
    port: int
    #: The server's live connections (``tunnel._seam.record_connections``).
    connections: _seam.Connections = field(default_factory=_seam.Connections)

    async def crash(self) -> None:
        """Stop the server as a process exit would: connections drop too.

        grpclib's ``Server.close()`` alone keeps accepted connections open,
        and they go on accepting new calls for the stopped server's handlers.
        """
        await stop(self.server, self.connections)


def listening_socket(port: int = 0) -> socket.socket:
    """A TCP socket on 127.0.0.1:*port* (0: the kernel picks).

    ``SO_REUSEADDR`` lets a restarted server bind the port of one just
    stopped; accepted connections inherit it, which Linux requires of
    every socket still holding the port.
    """
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock


@contextlib.asynccontextmanager
async def router(
    handler: tunnel.TunnelServiceHandler | None = None,
    *,
    services: Iterable[Any] = (),
    port: int = 0,
    listeners: Iterable[tuple[type[Any], Any]] = (),
    config: grpclib.config.Configuration | None = None,
) -> AsyncIterator[Router]:
    """A grpclib server with *handler* (default: key by ``x-key``) on 127.0.0.1.

    *listeners* are ``(event type, callback)`` pairs listened on the grpclib
    server before it starts.
    """
    if handler is None:
        handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    server = grpclib.server.Server([handler, *services], config=config)
    for event_type, callback in listeners:
        grpclib.events.listen(server, event_type, callback)
    connections = _seam.record_connections(server)
    sock = listening_socket(port)
    try:
        await server.start(sock=sock)
    except BaseException:
        sock.close()
        raise
    try:
        yield Router(server, handler, sock.getsockname()[1], connections)
    finally:
        await stop(server, connections)


async def stop(server: grpclib.server.Server, connections: _seam.Connections) -> None:
    """Close the server and drop its connections.

    Since Python 3.12.1 asyncio's ``Server.wait_closed()`` (which grpclib's
    awaits) also waits for every accepted connection to end, and a device
    may still hold one open.
    """
    server.close()
    _seam.drop_connections(connections)
    async with asyncio.timeout(10):
        await server.wait_closed()


@contextlib.asynccontextmanager
async def connected(port: int, **kwargs: Any) -> AsyncIterator[grpclib.client.Channel]:
    channel = grpclib.client.Channel("127.0.0.1", port, **kwargs)
    try:
        yield channel
    finally:
        channel.close()


# -- devices --------------------------------------------------------------------------


@dataclass
class Running:
    """A ``ReverseTunnelServer`` and the ``serve()`` tasks it runs."""

    server: tunnel.ReverseTunnelServer
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def serve(self, metadata: Any = None) -> asyncio.Task[None]:
        task = asyncio.create_task(self.server.serve(metadata), name="reverse serve")
        self.tasks.append(task)
        return task


@contextlib.asynccontextmanager
async def device_server(
    channel: grpclib.client.Channel,
    handlers: Iterable[Any],
    *,
    options: tunnel.TunnelOptions | None = None,
) -> AsyncIterator[Running]:
    """A ``ReverseTunnelServer``; closed, and its ``serve()`` tasks awaited, on exit."""
    running = Running(tunnel.ReverseTunnelServer(channel, list(handlers), options=options))
    try:
        yield running
    finally:
        running.server.close()
        async with asyncio.timeout(10):
            await asyncio.gather(*running.tasks, return_exceptions=True)
            await running.server.wait_closed()


@contextlib.asynccontextmanager
async def device(
    port: int,
    handler: tunnel.TunnelServiceHandler,
    name: str,
    *,
    key: str | None = None,
    service: Device | None = None,
    options: tunnel.TunnelOptions | None = None,
) -> AsyncIterator[Device]:
    """A device on its own connection, registered under *key* (default: *name*).

    Returns once *handler* has the tunnel in that key's pool.
    """
    service = service or Device(name)
    async with (
        connected(port) as channel,
        device_server(channel, [service], options=options) as running,
    ):
        serving = running.serve({KEY_HEADER: key or name})
        await registered(handler, key or name, serving)
        yield service


async def registered(
    handler: tunnel.TunnelServiceHandler, key: Hashable, serving: asyncio.Task[None]
) -> None:
    """Wait until *key*'s pool has a tunnel; fail if *serving* ended first."""
    ready = asyncio.create_task(handler.key_as_channel(key).wait_ready())
    try:
        async with asyncio.timeout(PROMPT):
            await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await ready
    if serving.done():
        serving.result()
        raise AssertionError("the reverse tunnel ended before it registered")


class Recorder:
    """A log of what happened, in order, and a way to wait for an entry."""

    def __init__(self) -> None:
        self.entries: list[tuple[str, Any]] = []
        self._changed = asyncio.Event()

    def add(self, what: str, value: Any = None) -> None:
        self.entries.append((what, value))
        self._changed.set()

    def names(self) -> list[str]:
        return [what for what, _ in self.entries]

    async def wait_for(self, what: str, count: int = 1) -> None:
        while self.names().count(what) < count:
            self._changed.clear()
            await self._changed.wait()


class LogWatch(logging.Handler):
    """Counts the ``tunnel`` log records containing *text*; ``wait(n)`` for n of them."""

    def __init__(self, text: str) -> None:
        super().__init__(logging.DEBUG)
        self.text = text
        self.messages: list[str] = []
        self._changed = asyncio.Event()

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if self.text in message:
            self.messages.append(message)
            self._changed.set()

    async def wait(self, n: int) -> None:
        while len(self.messages) < n:
            self._changed.clear()
            await self._changed.wait()

    def __enter__(self) -> LogWatch:
        logging.getLogger("tunnel").addHandler(self)
        return self

    def __exit__(self, *exc: object) -> None:
        logging.getLogger("tunnel").removeHandler(self)


class Proxy:
    """A TCP proxy on 127.0.0.1 that can turn into a black hole.

    ``freeze()`` makes every open connection silently drop what it gets,
    both ways, and never pass on a close: the peer at either end looks
    alive to TCP but answers nothing, which only keepalive can detect.
    New connections after ``thaw()`` work again.
    """

    def __init__(self, upstream_port: int) -> None:
        self.upstream_port = upstream_port
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: list[asyncio.StreamWriter] = []
        self._generation = [False]

    def freeze(self) -> None:
        self._generation[0] = True
        self._generation = [False]  # connections from now on flow again

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        frozen = self._generation
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        self._writers += [writer, up_writer]
        for src, dst in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.create_task(self._pump(src, dst, frozen))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    @staticmethod
    async def _pump(
        src: asyncio.StreamReader, dst: asyncio.StreamWriter, frozen: list[bool]
    ) -> None:
        while data := await src.read(65536):
            if not frozen[0]:
                dst.write(data)
                await dst.drain()
        if not frozen[0]:
            dst.close()

    async def __aenter__(self) -> Proxy:
        sock = listening_socket()
        self.port = sock.getsockname()[1]
        self._server = await asyncio.start_server(self._accept, sock=sock)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for writer in self._writers:
            writer.close()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self._server.wait_closed()
