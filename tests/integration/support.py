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
