"""Generated-code flavours on both ends of a call, tunneled and direct.

Users generate their stubs and service bases with one of three tool chains:
betterproto 2.0.0b7, betterproto2, or protoc with grpclib's own plugin (upb
messages). A tunnel channel must work for every stub flavour, and a tunnel
server must run every service flavour, in every combination -- the flavours
differ in how they drive grpclib streams (betterproto's background send task
for bidi calls, grpclib's ``send_message(end=True)``, async generators...).

Each server flavour implements the same echo semantics: unary echoes the
payload; client-stream returns the last payload and the message count;
server-stream sends ``count`` copies of the payload; bidi echoes each
payload. Each stub flavour is wrapped in a :class:`Client` that speaks plain
bytes, so every combination is checked against the same expectations, over
direct grpclib (control) and over a forward tunnel.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from google.protobuf import empty_pb2

import tests.stubs.bp2.grpchantesting as bp2
import tunnel.testing._pb.grpchantesting as bp7
from tests.conftest import DIRECT, FORWARD, Mode, OpenChannel, StartServer, server_tunnel_options
from tests.stubs.pb import test_grpc, test_pb2

# -- servers --------------------------------------------------------------------------


class Betterproto7Echo(bp7.TestServiceBase):
    """Echo service on betterproto 2.0.0b7's generated base."""

    async def unary(self, message: bp7.Message) -> bp7.Message:
        return bp7.Message(payload=message.payload)

    async def client_stream(self, message_iterator: AsyncIterator[bp7.Message]) -> bp7.Message:
        last, count = b"", 0
        async for message in message_iterator:
            last, count = message.payload, count + 1
        return bp7.Message(payload=last, count=count)

    async def server_stream(self, message: bp7.Message) -> AsyncIterator[bp7.Message]:
        for _ in range(message.count):
            yield bp7.Message(payload=message.payload)

    async def bidi_stream(
        self, message_iterator: AsyncIterator[bp7.Message]
    ) -> AsyncIterator[bp7.Message]:
        async for message in message_iterator:
            yield bp7.Message(payload=message.payload)


class Betterproto2Echo(bp2.TestServiceBase):
    """Echo service on betterproto2's generated base."""

    async def unary(self, message: bp2.Message) -> bp2.Message:
        return bp2.Message(payload=message.payload)

    async def client_stream(self, messages: AsyncIterator[bp2.Message]) -> bp2.Message:
        last, count = b"", 0
        async for message in messages:
            last, count = message.payload, count + 1
        return bp2.Message(payload=last, count=count)

    async def server_stream(self, message: bp2.Message) -> AsyncIterator[bp2.Message]:
        for _ in range(message.count):
            yield bp2.Message(payload=message.payload)

    async def bidi_stream(self, messages: AsyncIterator[bp2.Message]) -> AsyncIterator[bp2.Message]:
        async for message in messages:
            yield bp2.Message(payload=message.payload)


PbStream = grpclib.server.Stream[test_pb2.Message, test_pb2.Message]


class GrpclibEcho(test_grpc.TestServiceBase):
    """Echo service on grpclib's generated base: handlers drive the stream."""

    async def Unary(self, stream: PbStream) -> None:
        request = await stream.recv_message()
        assert request is not None
        await stream.send_message(test_pb2.Message(payload=request.payload))

    async def ClientStream(self, stream: PbStream) -> None:
        last, count = b"", 0
        async for message in stream:
            last, count = message.payload, count + 1
        await stream.send_message(test_pb2.Message(payload=last, count=count))

    async def ServerStream(self, stream: PbStream) -> None:
        request = await stream.recv_message()
        assert request is not None
        for _ in range(request.count):
            await stream.send_message(test_pb2.Message(payload=request.payload))

    async def BidiStream(self, stream: PbStream) -> None:
        async for message in stream:
            await stream.send_message(test_pb2.Message(payload=message.payload))

    async def UseExternalMessageTwice(
        self, stream: grpclib.server.Stream[empty_pb2.Empty, empty_pb2.Empty]
    ) -> None:
        await stream.recv_message()
        await stream.send_message(empty_pb2.Empty())


SERVERS: dict[str, Callable[[], Any]] = {
    "bp7-server": Betterproto7Echo,
    "bp2-server": Betterproto2Echo,
    "grpclib-server": GrpclibEcho,
}

# -- clients --------------------------------------------------------------------------


@dataclass(frozen=True)
class Client:
    """One stub flavour's four call kinds, in plain bytes."""

    unary: Callable[[bytes], Awaitable[bytes]]
    client_stream: Callable[[Sequence[bytes]], Awaitable[tuple[bytes, int]]]
    server_stream: Callable[[bytes, int], Awaitable[list[bytes]]]
    bidi: Callable[[Sequence[bytes]], Awaitable[list[bytes]]]


def betterproto7_client(channel: grpclib.client.Channel) -> Client:
    stub = bp7.TestServiceStub(channel)

    async def unary(payload: bytes) -> bytes:
        reply = await stub.unary(bp7.Message(payload=payload))
        return reply.payload

    async def client_stream(payloads: Sequence[bytes]) -> tuple[bytes, int]:
        reply = await stub.client_stream([bp7.Message(payload=p) for p in payloads])
        return reply.payload, reply.count

    async def server_stream(payload: bytes, count: int) -> list[bytes]:
        request = bp7.Message(payload=payload, count=count)
        return [reply.payload async for reply in stub.server_stream(request)]

    async def bidi(payloads: Sequence[bytes]) -> list[bytes]:
        requests = [bp7.Message(payload=p) for p in payloads]
        return [reply.payload async for reply in stub.bidi_stream(requests)]

    return Client(unary, client_stream, server_stream, bidi)


def betterproto2_client(channel: grpclib.client.Channel) -> Client:
    stub = bp2.TestServiceStub(channel)

    async def unary(payload: bytes) -> bytes:
        reply = await stub.unary(bp2.Message(payload=payload))
        return reply.payload

    async def client_stream(payloads: Sequence[bytes]) -> tuple[bytes, int]:
        reply = await stub.client_stream([bp2.Message(payload=p) for p in payloads])
        return reply.payload, reply.count

    async def server_stream(payload: bytes, count: int) -> list[bytes]:
        request = bp2.Message(payload=payload, count=count)
        return [reply.payload async for reply in stub.server_stream(request)]

    async def bidi(payloads: Sequence[bytes]) -> list[bytes]:
        requests = [bp2.Message(payload=p) for p in payloads]
        return [reply.payload async for reply in stub.bidi_stream(requests)]

    return Client(unary, client_stream, server_stream, bidi)


def grpclib_client(channel: grpclib.client.Channel) -> Client:
    stub = test_grpc.TestServiceStub(channel)

    async def unary(payload: bytes) -> bytes:
        reply = await stub.Unary(test_pb2.Message(payload=payload))
        return reply.payload

    async def client_stream(payloads: Sequence[bytes]) -> tuple[bytes, int]:
        reply = await stub.ClientStream([test_pb2.Message(payload=p) for p in payloads])
        return reply.payload, reply.count

    async def server_stream(payload: bytes, count: int) -> list[bytes]:
        replies = await stub.ServerStream(test_pb2.Message(payload=payload, count=count))
        return [reply.payload for reply in replies]

    async def bidi(payloads: Sequence[bytes]) -> list[bytes]:
        replies = await stub.BidiStream([test_pb2.Message(payload=p) for p in payloads])
        return [reply.payload for reply in replies]

    return Client(unary, client_stream, server_stream, bidi)


CLIENTS: dict[str, Callable[[grpclib.client.Channel], Client]] = {
    "bp7-stub": betterproto7_client,
    "bp2-stub": betterproto2_client,
    "grpclib-stub": grpclib_client,
}

# -- tests ----------------------------------------------------------------------------

PAYLOADS = [b"first", b"", b"\x00\x01\x02\x03" * 100, b"last"]


@pytest.fixture
async def client(
    start_server: StartServer,
    open_channel: OpenChannel,
    mode: Mode,
    server_flavor: str,
    stub_flavor: str,
) -> Client:
    port = await start_server(
        [SERVERS[server_flavor]()], tunnel_options=server_tunnel_options(mode)
    )
    return CLIENTS[stub_flavor](await open_channel(port, mode))


pytestmark = [
    pytest.mark.parametrize("mode", [DIRECT, FORWARD], ids=str),
    pytest.mark.parametrize("server_flavor", list(SERVERS)),
    pytest.mark.parametrize("stub_flavor", list(CLIENTS)),
]


async def test_unary(client: Client) -> None:
    assert await client.unary(b"hello") == b"hello"


async def test_client_stream(client: Client) -> None:
    assert await client.client_stream(PAYLOADS) == (b"last", 4)


async def test_server_stream(client: Client) -> None:
    assert await client.server_stream(b"copy", 3) == [b"copy"] * 3


async def test_bidi(client: Client) -> None:
    assert await client.bidi(PAYLOADS) == PAYLOADS
