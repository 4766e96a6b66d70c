"""Helpers of the integration tests: servers, tunnels, a probe service, calls.

Tests here open their own servers and tunnels with ``async with`` inside the
test body, so everything is entered and exited in the test's task and closed
before the autouse leak check looks for pending tasks.

``Probe`` is a service whose handlers each test writes itself, as plain
functions of the grpclib server stream: the tests need handlers that block
until told to go on, record that they were cancelled, read their deadline,
and so on -- things ``TestService`` does not do.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import grpclib.client
import grpclib.server
from grpclib.const import Cardinality, Handler
from grpclib.metadata import _MetadataLike

import tunnel
from tests.conftest import _listening_socket
from tunnel._pb.tunnel_pb2 import ClientToServer, ServerToClient
from tunnel.testing._pb.grpchantesting import Message, TestServiceStub

#: Upper bound of one integration test's body; each test picks its own,
#: shorter bounds for what it asserts happens promptly.
TEST_TIMEOUT = 20.0

FLOW_CONTROL = (False, True)


def fc_id(disable: bool) -> str:
    return "nofc" if disable else "fc"


def options(*, disable_flow_control: bool = False, **kwargs: Any) -> tunnel.TunnelOptions:
    return tunnel.TunnelOptions(disable_flow_control=disable_flow_control, **kwargs)


# -- servers and tunnels ------------------------------------------------------------


@dataclass
class Served:
    server: grpclib.server.Server
    port: int


@contextlib.asynccontextmanager
async def serving(
    handlers: Iterable[Any], *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[Served]:
    """A grpclib server on 127.0.0.1 (kernel-chosen port), closed on exit."""
    server = grpclib.server.Server(list(handlers))
    sock = _listening_socket()
    try:
        await server.start(sock=sock, ssl=ssl_context)
    except BaseException:
        sock.close()
        raise
    try:
        yield Served(server, sock.getsockname()[1])
    finally:
        server.close()
        async with asyncio.timeout(10):
            await server.wait_closed()


@contextlib.asynccontextmanager
async def connected(
    port: int, *, ssl_context: ssl.SSLContext | None = None
) -> AsyncIterator[grpclib.client.Channel]:
    channel = grpclib.client.Channel("127.0.0.1", port, ssl=ssl_context)
    try:
        yield channel
    finally:
        channel.close()


@contextlib.asynccontextmanager
async def tunnel_over(
    port: int,
    *,
    opts: tunnel.TunnelOptions | None = None,
    metadata: _MetadataLike | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> AsyncIterator[tunnel.TunnelChannel]:
    """A forward tunnel to the server on *port*, over a channel of its own."""
    async with (
        connected(port, ssl_context=ssl_context) as channel,
        tunnel.open_tunnel(channel, options=opts, metadata=metadata) as tunneled,
    ):
        yield tunneled


# -- a tunnel server that breaks the protocol -----------------------------------------

OPEN_TUNNEL = "/grpctunnel.v1.TunnelService/OpenTunnel"


class FakeTunnelServer:
    """Answers OpenTunnel with the negotiate header, then only *frames*, then waits.

    With *after_request*, it then reads the client's first frame (the first
    call's ``new_stream``) and sends those frames too.
    """

    def __init__(self, *frames: ServerToClient, after_request: Sequence[ServerToClient] = ()):
        self._frames = frames
        self._after_request = after_request
        self.ended = asyncio.Event()

    async def open_tunnel(
        self, stream: grpclib.server.Stream[ClientToServer, ServerToClient]
    ) -> None:
        try:
            await stream.send_initial_metadata(metadata={"grpctunnel-negotiate": "on"})
            for frame in self._frames:
                await stream.send_message(frame)
            if self._after_request:
                await stream.recv_message()
                for frame in self._after_request:
                    await stream.send_message(frame)
            await asyncio.Event().wait()
        finally:
            self.ended.set()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            OPEN_TUNNEL: Handler(
                self.open_tunnel, Cardinality.STREAM_STREAM, ClientToServer, ServerToClient
            )
        }


# -- the probe service --------------------------------------------------------------

PROBE = "tunnel.integration.Probe"

HandlerFunc = Callable[[grpclib.server.Stream[Message, Message]], Awaitable[None]]


class Probe:
    """A service of ``Message`` methods whose handlers the test supplies."""

    def __init__(self, **methods: tuple[Cardinality, HandlerFunc]) -> None:
        self._methods = methods

    def __mapping__(self) -> dict[str, Handler]:
        return {
            f"/{PROBE}/{name}": Handler(func, cardinality, Message, Message)
            for name, (cardinality, func) in self._methods.items()
        }


def probe_call(
    channel: grpclib.client.Channel,
    name: str,
    cardinality: Cardinality,
    *,
    timeout: float | None = None,
    metadata: _MetadataLike | None = None,
) -> grpclib.client.Stream[Message, Message]:
    return channel.request(
        f"/{PROBE}/{name}", cardinality, Message, Message, timeout=timeout, metadata=metadata
    )


class Latch:
    """Counts handlers reaching a point; ``wait(n)`` returns once n did."""

    def __init__(self) -> None:
        self.count = 0
        self._changed = asyncio.Event()

    def hit(self) -> None:
        self.count += 1
        self._changed.set()

    async def wait(self, n: int) -> None:
        while self.count < n:
            self._changed.clear()
            await self._changed.wait()


# -- the four kinds of call through TestService -------------------------------------


async def all_kinds(channel: grpclib.client.Channel, tag: bytes = b"x") -> None:
    """One call of each kind through ``TestService``; asserts the replies."""
    stub = TestServiceStub(channel)
    reply = await stub.unary(Message(payload=b"unary-" + tag))
    assert reply.payload == b"unary-" + tag

    reply = await stub.client_stream(Message(payload=b"cs-" + tag + bytes([i])) for i in range(3))
    assert (reply.payload, reply.count) == (b"cs-" + tag + bytes([2]), 3)

    replies = [r async for r in stub.server_stream(Message(payload=b"ss-" + tag, count=4))]
    assert [r.payload for r in replies] == [b"ss-" + tag] * 4

    requests = [Message(payload=b"bidi-" + tag + bytes([i])) for i in range(5)]
    replies = [r async for r in stub.bidi_stream(requests)]
    assert [(r.payload, r.count) for r in replies] == [
        (m.payload, i + 1) for i, m in enumerate(requests)
    ]


async def bounded(awaitables: Sequence[Awaitable[Any]], seconds: float) -> list[Any]:
    """Gather, failing the test if that takes longer than *seconds*."""
    async with asyncio.timeout(seconds):
        return await asyncio.gather(*awaitables, return_exceptions=True)


# -- blocking handlers ----------------------------------------------------------------


class Blocking:
    """Handlers of every kind that block until cancelled, and say so.

    ``started`` counts handlers that began, ``cancelled`` those that saw
    ``CancelledError``.  ``ClientStream`` never reads, so with flow control
    on a client sending to it blocks once the window is full.
    """

    KINDS = ("Unary", "ClientStream", "ServerStream", "BidiStream")

    def __init__(self) -> None:
        self.started = Latch()
        self.cancelled = Latch()
        self._never = asyncio.Event()

    async def _block(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        self.started.hit()
        try:
            if stream.metadata is not None and stream.metadata.get("x-reply-first") == "1":
                await stream.send_message(Message(payload=b"first"))
            await self._never.wait()
        except asyncio.CancelledError:
            self.cancelled.hit()
            raise

    def service(self) -> Probe:
        return Probe(
            Unary=(Cardinality.UNARY_UNARY, self._block),
            ClientStream=(Cardinality.STREAM_UNARY, self._block),
            ServerStream=(Cardinality.UNARY_STREAM, self._block),
            BidiStream=(Cardinality.STREAM_STREAM, self._block),
        )


CARDINALITY = {
    "Unary": Cardinality.UNARY_UNARY,
    "ClientStream": Cardinality.STREAM_UNARY,
    "ServerStream": Cardinality.UNARY_STREAM,
    "BidiStream": Cardinality.STREAM_STREAM,
}


async def call_until_it_ends(
    channel: grpclib.client.Channel, kind: str, *, flood: bool = False
) -> BaseException | None:
    """Make one call of *kind* to a ``Blocking`` handler; return how it ended.

    With *flood*, a client-streaming call keeps sending 16 KB messages (and
    so blocks on a full window); otherwise each call sends one message and
    waits for the reply.
    """
    try:
        async with probe_call(channel, kind, CARDINALITY[kind]) as stream:
            if flood:
                while True:
                    await stream.send_message(Message(payload=b"\x05" * 16_000))
            await stream.send_message(Message(payload=b"hello"))
            await stream.recv_message()
            await stream.recv_message()
    except Exception as exc:
        return exc
    return None


# -- a TCP proxy whose connections the test can cut ---------------------------------


class Proxy:
    """Forwards 127.0.0.1 connections to a port.

    ``cut()`` aborts every connection; ``freeze()`` stops forwarding while
    keeping the connections open (a NAT that dropped its mapping, a frozen
    VM, a black-holing middlebox), and ``thaw()`` resumes.
    """

    def __init__(self, target_port: int) -> None:
        self._target = target_port
        self._server: asyncio.Server | None = None
        self._writers: list[asyncio.StreamWriter] = []
        self._tasks: set[asyncio.Task[Any]] = set()
        self._flowing = asyncio.Event()
        self._flowing.set()
        self.port = 0
        #: Connections accepted so far.
        self.connections = 0

    async def __aenter__(self) -> Proxy:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._writers.append(writer)
        self.connections += 1
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self._target)
            self._writers.append(up_writer)
            await asyncio.gather(
                self._pump(reader, up_writer), self._pump(up_reader, writer), return_exceptions=True
            )
        finally:
            self._tasks.discard(task)

    async def _pump(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                await self._flowing.wait()
                data = await reader.read(65536)
                if not data:
                    break
                # Data read just before a freeze is held back too.
                await self._flowing.wait()
                writer.write(data)
                await writer.drain()
        finally:
            writer.transport.abort()

    def freeze(self) -> None:
        """Stop forwarding in both directions; connections stay open."""
        self._flowing.clear()

    def thaw(self) -> None:
        self._flowing.set()

    def cut(self) -> None:
        """Abort every connection at once (no FIN, no goodbye)."""
        for writer in self._writers:
            writer.transport.abort()

    async def __aexit__(self, *exc_info: object) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        self.thaw()
        async with asyncio.timeout(5):
            await self._server.wait_closed()
            while self._tasks:
                await asyncio.gather(*self._tasks, return_exceptions=True)
