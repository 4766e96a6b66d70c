"""A rolling restart of devices loses no call.

Two devices serve one key.  One of them stops gracefully (it refuses new
calls while its running ones finish).  The network server learns it from the
first refusal -- a ``close_stream`` before any headers, UNAVAILABLE: nothing
of the call was processed -- takes that tunnel out of the pool's rotation,
and sends the refused call, once and transparently, to the other device.
"""

from __future__ import annotations

import asyncio

import grpclib.const
import pytest
from grpclib.exceptions import GRPCError

import tunnel
from tunnel.testing import Message

from .support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Device,
    connected,
    device_server,
    key_from_metadata,
    router,
    who,
)

CALLS = 60


async def test_graceful_stop_of_one_device_loses_no_call() -> None:
    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    stopping, staying = Device("stopping"), Device("staying")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as first_channel,
        connected(net.port) as second_channel,
        device_server(first_channel, [stopping]) as first,
        device_server(second_channel, [staying]) as second,
    ):
        first.serve({KEY_HEADER: "k"})
        pool = handler.key_as_channel("k")
        await pool.wait_ready()
        second.serve({KEY_HEADER: "k"})
        while len(handler.all_reverse_tunnels()) < 2:
            await asyncio.sleep(0.01)
        by_name = {await who(c): c for c in handler.all_reverse_tunnels()}
        # A call in flight on the device that stops keeps it draining.
        in_flight = asyncio.create_task(who(by_name["stopping"], b"block"))
        async with asyncio.timeout(PROMPT):
            await stopping.started.wait()
        graceful = asyncio.create_task(first.server.graceful_stop())
        await asyncio.sleep(0)  # the stop has begun: new calls are refused there

        answers = await asyncio.gather(*(who(pool) for _ in range(CALLS)), return_exceptions=True)
        failed = [a for a in answers if isinstance(a, BaseException)]
        assert failed == [], failed
        assert set(answers) == {"staying"}
        assert by_name["stopping"]._tunnel.draining  # out of the rotation

        stopping.release.set()
        async with asyncio.timeout(PROMPT):
            assert await in_flight == "stopping"  # the running call finished
            await graceful
        assert await who(pool) == "staying"


async def test_a_refused_call_is_retried_only_once() -> None:
    """Both devices stop: the second refusal reaches the caller."""
    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    a, b = Device("a"), Device("b")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel_a,
        connected(net.port) as channel_b,
        device_server(channel_a, [a]) as device_a,
        device_server(channel_b, [b]) as device_b,
    ):
        device_a.serve({KEY_HEADER: "k"})
        device_b.serve({KEY_HEADER: "k"})
        while len(handler.all_reverse_tunnels()) < 2:
            await asyncio.sleep(0.01)
        blocked = []
        for name, device in (("a", a), ("b", b)):
            (channel,) = [c for c in handler.all_reverse_tunnels() if await who(c) == name]
            blocked.append(asyncio.create_task(who(channel, b"block")))
            async with asyncio.timeout(PROMPT):
                await device.started.wait()
        stops = [
            asyncio.create_task(device_a.server.graceful_stop()),
            asyncio.create_task(device_b.server.graceful_stop()),
        ]
        await asyncio.sleep(0)
        with pytest.raises(GRPCError) as exc_info:
            await who(handler.key_as_channel("k"))
        assert exc_info.value.status is grpclib.const.Status.UNAVAILABLE
        a.release.set()
        b.release.set()
        async with asyncio.timeout(PROMPT):
            await asyncio.gather(*blocked, *stops)


async def test_large_requests_are_not_kept_for_a_retry() -> None:
    """Only a call whose requests fit the replay limit is retried."""
    from tunnel._client_stream import REPLAY_LIMIT

    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    device = Device("d")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [device]) as running,
    ):
        running.serve({KEY_HEADER: "k"})
        pool = handler.key_as_channel("k")
        await pool.wait_ready()
        call = pool.request(
            "/grpchantesting.TestService/Unary",
            grpclib.const.Cardinality.UNARY_UNARY,
            Message,
            Message,
        )
        async with call:
            await call.send_message(Message(payload=b"x" * (REPLAY_LIMIT + 1)), end=True)
            assert call._replay is None  # too big to keep
            reply = await call.recv_message()
        assert reply is not None and reply.payload == b"d"
