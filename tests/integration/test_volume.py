"""Big messages and many calls on one tunnel."""

from __future__ import annotations

import asyncio
import os
import random

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    FLOW_CONTROL,
    TEST_TIMEOUT,
    fc_id,
    options,
    serving,
    tunnel_over,
)
from tunnel.testing import TestService
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing._pb.grpchantesting import TestServiceStub as ServiceStub

MiB = 1024 * 1024


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_ten_megabyte_round_trip(disable_fc: bool) -> None:
    opts = options(disable_flow_control=disable_fc, max_receive_message_length=16 * MiB)
    payload = os.urandom(10 * 1000 * 1000)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()], options=opts)]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        stub = ServiceStub(channel)
        reply = await stub.unary(Message(payload=payload))
        assert reply.payload == payload
        replies = [r async for r in stub.bidi_stream([Message(payload=payload)])]
        assert [r.payload for r in replies] == [payload]


@pytest.mark.parametrize(
    ("client_window", "server_window"),
    [(MiB, MiB), (MiB, 65_536), (65_536, 4 * MiB)],
    ids=["both-1MiB", "client-1MiB", "server-4MiB"],
)
async def test_configured_windows_carry_big_messages(
    client_window: int, server_window: int
) -> None:
    """Each end grants the window it announces; mixed sizes interoperate."""
    payload = os.urandom(3 * 1000 * 1000)
    client_opts = options(initial_window_size=client_window)
    server_opts = options(initial_window_size=server_window)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()], options=server_opts)]) as served,
        tunnel_over(served.port, opts=client_opts) as channel,
    ):
        stub = ServiceStub(channel)
        replies = [r async for r in stub.bidi_stream([Message(payload=payload)] * 2)]
        assert [r.payload for r in replies] == [payload, payload]


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_default_limit_fails_only_the_oversized_call(disable_fc: bool) -> None:
    """4 MiB by default, like gRPC: 5 MB fails that call, the tunnel lives on."""
    big = Message(payload=b"\x01" * (5 * 1000 * 1000))
    server_opts = options(disable_flow_control=disable_fc)
    raised = options(disable_flow_control=disable_fc, max_receive_message_length=8 * MiB)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()], options=server_opts)]) as strict,
        serving([tunnel.TunnelServiceHandler([TestService()], options=raised)]) as lenient,
        tunnel_over(strict.port, opts=raised) as to_strict,
        tunnel_over(lenient.port, opts=server_opts) as to_lenient,
    ):
        # Too big for the server's default limit.
        with pytest.raises(GRPCError) as exc_info:
            await ServiceStub(to_strict).unary(big)
        assert exc_info.value.status is Status.RESOURCE_EXHAUSTED
        reply = await ServiceStub(to_strict).unary(Message(payload=b"next"))
        assert reply.payload == b"next"

        # Accepted by the server, but its echo is too big for our default limit.
        with pytest.raises(GRPCError) as exc_info:
            await ServiceStub(to_lenient).unary(big)
        assert exc_info.value.status is Status.RESOURCE_EXHAUSTED
        reply = await ServiceStub(to_lenient).unary(Message(payload=b"next"))
        assert reply.payload == b"next"

        assert to_strict.error is None and to_lenient.error is None
        assert not to_strict.closed and not to_lenient.closed


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_two_hundred_concurrent_calls(disable_fc: bool) -> None:
    opts = options(disable_flow_control=disable_fc)
    rng = random.Random(200)

    async def one(i: int, stub: ServiceStub) -> None:
        tag = f"call-{i}-".encode()
        size = rng.choice([0, 10, 1000, 40_000])
        payload = tag + os.urandom(size)
        kind = i % 4
        if kind == 0:
            reply = await stub.unary(Message(payload=payload))
            assert reply.payload == payload
        elif kind == 1:
            requests = [Message(payload=payload + bytes([n])) for n in range(i % 5 + 1)]
            reply = await stub.client_stream(requests)
            assert (reply.payload, reply.count) == (requests[-1].payload, len(requests))
        elif kind == 2:
            count = i % 7
            replies = [r async for r in stub.server_stream(Message(payload=payload, count=count))]
            assert [r.payload for r in replies] == [payload] * count
        else:
            requests = [Message(payload=payload + bytes([n])) for n in range(i % 6 + 1)]
            replies = [r async for r in stub.bidi_stream(requests)]
            assert [r.payload for r in replies] == [m.payload for m in requests]

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()], options=opts)]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        stub = ServiceStub(channel)
        async with asyncio.TaskGroup() as group:
            for i in range(200):
                group.create_task(one(i, stub))
        assert channel.error is None
