"""A frame over ``max_frame_size`` ends its tunnel, at every end, before it is read.

Four ends read frames from a peer: the forward tunnel's server and client,
the reverse tunnel's network server and device.  Each gets a hand-made
frame one byte (or a few) over a small bound: the end that serves the
carrying call answers RESOURCE_EXHAUSTED "tunnel protocol error: frame
larger than max (N vs. LIMIT bytes)"; the end that made it fails its calls
in flight with UNAVAILABLE and keeps the error as the tunnel's ``error``.
A frame of exactly the bound is read, and when its only fault is metadata
over ``max_metadata_size`` it fails its own stream only, as before.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from google.protobuf.message import Message as ProtoMessage
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.hostile import (
    OPEN_REVERSE_TUNNEL,
    OPEN_TUNNEL,
    RawTunnelServer,
    big_frame_head,
    call_status,
    write_big_frame,
    write_frame,
)
from tests.integration.support import TEST_TIMEOUT, connected, serving, tunnel_over
from tunnel._core.flow import MAX_CHUNK
from tunnel._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    Metadata,
    NewStream,
    ServerToClient,
    Settings,
)
from tunnel.options import FRAME_OVERHEAD
from tunnel.testing import TestService
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing._pb.grpchantesting import TestServiceStub as Stub

METADATA_LIMIT = 1024
LIMIT = METADATA_LIMIT + MAX_CHUNK + FRAME_OVERHEAD
SMALL = tunnel.TunnelOptions(max_metadata_size=METADATA_LIMIT, max_frame_size=LIMIT)
UNARY = "/grpchantesting.TestService/Unary"
#: Data of a frame just over the bound (the frame's own fields add a few bytes).
OVER = LIMIT - len(big_frame_head(1, LIMIT)) + 5 + 1
TOO_LARGE = f"frame larger than max ({LIMIT + 1} vs. {LIMIT} bytes)"


def test_the_hand_made_frame_is_one_byte_over() -> None:
    assert len(big_frame_head(1, OVER)) - 5 + OVER == LIMIT + 1


def settings_frame() -> ServerToClient:
    return ServerToClient(
        stream_id=-1,
        settings=Settings(
            supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE], initial_window_size=65_536
        ),
    )


def of_size(size: int, make: Callable[[int], ProtoMessage]) -> ProtoMessage:
    """``make(n)`` for the ``n`` whose frame serializes to exactly ``size`` bytes."""
    n = size - make(0).ByteSize()
    while make(n).ByteSize() > size:
        n -= 1
    frame = make(n)
    assert frame.ByteSize() == size
    return frame


def new_stream_of_size(stream_id: int, size: int) -> ClientToServer:
    def make(n: int) -> ClientToServer:
        md = Metadata()
        md.md["x-big"].val.append("v" * n)
        return ClientToServer(
            stream_id=stream_id,
            new_stream=NewStream(
                method_name=UNARY, request_headers=md, protocol_revision=REVISION_ONE
            ),
        )

    frame = of_size(size, make)
    assert isinstance(frame, ClientToServer)
    return frame


def headers_of_size(stream_id: int, size: int) -> ServerToClient:
    def make(n: int) -> ServerToClient:
        frame = ServerToClient(stream_id=stream_id)
        frame.response_headers.md["x-big"].val.append("v" * n)
        return frame

    frame = of_size(size, make)
    assert isinstance(frame, ServerToClient)
    return frame


async def recv(stream: Any) -> Any:
    frame = await stream.recv_message()
    assert frame is not None, "the carrying call ended"
    return frame


async def recv_until(stream: Any, stream_id: int, kind: str) -> Any:
    while True:
        frame = await recv(stream)
        if frame.stream_id == stream_id and frame.WhichOneof("frame") == kind:
            return frame


# -- the forward tunnel's server ----------------------------------------------------------


async def test_forward_server_ends_the_tunnel_on_a_frame_over_the_bound() -> None:
    async def attack(stream: grpclib.client.Stream[Any, Any]) -> None:
        assert (await recv(stream)).HasField("settings")
        # Exactly the bound, metadata over its own limit: only that stream fails.
        await write_frame(stream, new_stream_of_size(1, LIMIT))
        closed = await recv_until(stream, 1, "close_stream")
        assert closed.close_stream.status.code == Status.INVALID_ARGUMENT.value
        assert "metadata exceeds" in closed.close_stream.status.message
        await write_big_frame(stream, OVER, stream_id=3)

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()], options=SMALL)]) as served,
        connected(served.port) as channel,
    ):
        status = await call_status(channel, OPEN_TUNNEL, attack)
    assert status is not None
    assert (status.status, status.message) == (
        Status.RESOURCE_EXHAUSTED,
        f"tunnel protocol error: {TOO_LARGE}",
    )


# -- the forward tunnel's client ----------------------------------------------------------


async def test_forward_client_ends_the_tunnel_on_a_frame_over_the_bound() -> None:
    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.send_message(settings_frame())
        await recv_until(stream, 1, "new_stream")
        await write_frame(stream, headers_of_size(1, LIMIT))
        await recv_until(stream, 2, "new_stream")
        await write_big_frame(stream, OVER, stream_id=2)
        await asyncio.Event().wait()  # the client ends the call

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([RawTunnelServer(behave)]) as served,
        tunnel_over(served.port, opts=SMALL) as tunneled,
    ):
        stub = Stub(tunneled)
        with pytest.raises(GRPCError) as first:
            await stub.unary(Message())
        # Exactly the bound, metadata over its own limit: only that call fails.
        assert first.value.status is Status.INTERNAL
        assert "metadata exceeds" in (first.value.message or "")
        with pytest.raises(GRPCError) as second:
            await stub.unary(Message())
        assert second.value.status is Status.UNAVAILABLE
        assert TOO_LARGE in (second.value.message or "")
        await tunneled.wait_closed()
        assert isinstance(tunneled.error, tunnel.FrameTooLarge)
        assert (tunneled.error.size, tunneled.error.limit) == (LIMIT + 1, LIMIT)


# -- the reverse tunnel's network server --------------------------------------------------


async def test_reverse_network_server_ends_the_tunnel_on_a_frame_over_the_bound() -> None:
    handler = tunnel.TunnelServiceHandler(options=SMALL)
    outcome: asyncio.Future[BaseException | None] = asyncio.get_running_loop().create_future()

    async def call_the_device() -> None:
        try:
            await Stub(handler.as_channel()).unary(Message())
        except Exception as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    async def attack(stream: grpclib.client.Stream[Any, Any]) -> None:
        await write_frame(stream, settings_frame())
        await handler.as_channel().wait_ready()
        calling = asyncio.create_task(call_the_device())
        await recv_until(stream, 1, "new_stream")
        await write_big_frame(stream, OVER, stream_id=1)
        await calling

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler]) as served,
        connected(served.port) as channel,
    ):
        status = await call_status(channel, OPEN_REVERSE_TUNNEL, attack)
        assert not handler.all_reverse_tunnels()
    assert status is not None
    assert (status.status, status.message) == (
        Status.RESOURCE_EXHAUSTED,
        f"tunnel protocol error: {TOO_LARGE}",
    )
    in_flight = outcome.result()
    assert isinstance(in_flight, GRPCError) and in_flight.status is Status.UNAVAILABLE
    assert TOO_LARGE in (in_flight.message or "")


# -- the reverse tunnel's device ----------------------------------------------------------


async def test_device_ends_the_tunnel_on_a_frame_over_the_bound() -> None:
    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        assert (await recv(stream)).HasField("settings")
        await write_big_frame(stream, OVER, stream_id=1)
        await asyncio.Event().wait()  # the device ends the call

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([RawTunnelServer(behave)]) as served,
        connected(served.port) as channel,
    ):
        device = tunnel.ReverseTunnelServer(channel, [TestService()], options=SMALL)
        with pytest.raises(GRPCError) as exc_info:
            await device.serve()
    assert (exc_info.value.status, exc_info.value.message) == (
        Status.RESOURCE_EXHAUSTED,
        f"tunnel protocol error: {TOO_LARGE}",
    )


# -- a tunnel nested in a tunnel --------------------------------------------------------------


async def test_nested_tunnel_applies_the_bound_after_reassembly() -> None:
    """The inner carrying call has no HTTP/2 stream: the outer tunnel's
    ``max_receive_message_length`` bounded the frame's reassembly, and the
    inner tunnel refuses it once whole."""
    size = 100_000

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.send_message(settings_frame())
        await stream.send_message(ServerToClient(stream_id=7, more_response_data=b"x" * size))
        await asyncio.Event().wait()  # the client ends the call

    outer_handler = tunnel.TunnelServiceHandler([RawTunnelServer(behave)])
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([outer_handler]) as served,
        tunnel_over(served.port) as outer,
        tunnel.open_tunnel(outer, options=SMALL) as inner,
    ):
        await inner.wait_closed()
        assert isinstance(inner.error, tunnel.FrameTooLarge)
        assert inner.error.limit == LIMIT and inner.error.size > size
        # The outer tunnel is not affected.
        assert not outer.closed
