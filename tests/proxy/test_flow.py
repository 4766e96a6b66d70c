"""Volume through a proxy: back-pressure end to end, big messages, many calls.

Back-pressure is shown by what the backend manages to do while the caller
holds back: with every hop's window small, the sender can get only a few
windows' worth of messages ahead of the reader, however long it is given.
"Given" is a bounded wait for something that must *not* happen (the lead
growing past the bound); the assertion that matters is the largest lead
observed over the whole transfer, checked on every message sent.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
from grpclib.const import Cardinality

import tunnel
from tunnel.testing._pb import grpchantesting as bp
from tunnel.testing._pb.grpchantesting import Message

from .support import PROXIED, SMALL_WINDOWS, TEST_TIMEOUT, Probe, open_route

pytestmark = pytest.mark.timeout(90)

#: 16 KiB messages: four fill a 64 KiB window.
CHUNK = b"m" * 16 * 1024
#: More messages than every window on the way holds together.
COUNT = 200
#: The most messages the sender may be ahead of the reader: one window
#: (4 messages) per hop (3 on the longest route) plus the one message each
#: proxy holds, doubled for slack.  Without back-pressure the lead would
#: reach COUNT.
BOUND = 40
#: How long the sender is given to run ahead while the reader holds back.
HOLD = 0.5
#: Tunnel windows fixed at 64 KiB, as BOUND assumes (they would grow to
#: ``max_window_size`` while the reader kept up: a bound, but a larger one).
FIXED_WINDOWS = tunnel.TunnelOptions(max_window_size=65_536)


@pytest.mark.parametrize("kind", PROXIED)
async def test_a_slow_reader_slows_the_backend_sending(kind: str) -> None:
    async with open_route(kind, config=SMALL_WINDOWS, options=FIXED_WINDOWS) as route:
        probe = route.probe
        probe.lead_over = BOUND
        call = route.call(Probe.PREFIX + "Flood", Cardinality.UNARY_STREAM)
        async with asyncio.timeout(TEST_TIMEOUT), call:
            await call.send_message(Message(payload=CHUNK, count=COUNT), end=True)
            assert await call.recv_message() is not None
            probe.read += 1
            with pytest.raises(TimeoutError):  # the backend must stall, not run ahead
                async with asyncio.timeout(HOLD):
                    await probe.lead_exceeded.wait()
            while await call.recv_message() is not None:
                probe.read += 1
    assert probe.read == probe.sent == COUNT
    assert probe.max_lead <= BOUND


@pytest.mark.parametrize("kind", PROXIED)
async def test_a_slow_backend_reader_slows_the_caller_sending(kind: str) -> None:
    async with open_route(kind, config=SMALL_WINDOWS, options=FIXED_WINDOWS) as route:
        probe = route.probe
        probe.lead_over = BOUND
        call = route.call(Probe.PREFIX + "Sink", Cardinality.STREAM_UNARY)

        async def send_all() -> None:
            for _ in range(COUNT):
                await call.send_message(Message(payload=CHUNK))
                probe.note_sent_by_caller()
            await call.end()

        async with asyncio.timeout(TEST_TIMEOUT), call:
            sending = asyncio.create_task(send_all())
            try:
                with pytest.raises(TimeoutError):  # the caller must stall, not run ahead
                    async with asyncio.timeout(HOLD):
                        await probe.lead_exceeded.wait()
                assert not sending.done()
                probe.release.set()
                reply = await call.recv_message()
                await sending
            finally:
                sending.cancel()
                await asyncio.wait({sending})
    assert reply is not None and reply.count == COUNT
    assert probe.max_lead <= BOUND


@pytest.mark.parametrize("kind", PROXIED)
async def test_a_10_mib_message_each_way_with_raised_limits(kind: str) -> None:
    big = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    options = tunnel.TunnelOptions(max_receive_message_length=16 * 1024 * 1024)
    async with open_route(kind, options=options) as route:
        stub = bp.TestServiceStub(route.channel)
        async with asyncio.timeout(TEST_TIMEOUT):
            reply = await stub.unary(Message(payload=big), metadata=route.metadata)
    assert reply.payload == big


async def _callers(count: int) -> AsyncIterator[int]:
    for i in range(count):
        yield i


@pytest.mark.parametrize("kind", PROXIED)
async def test_200_concurrent_calls_through_one_proxy(kind: str) -> None:
    async with open_route(kind) as route:
        stub = bp.TestServiceStub(route.channel)

        async def one(i: int) -> bytes:
            reply = await stub.unary(Message(payload=str(i).encode()), metadata=route.metadata)
            return reply.payload

        async with asyncio.timeout(TEST_TIMEOUT):
            replies = await asyncio.gather(*(one(i) for i in range(200)))
    assert replies == [str(i).encode() for i in range(200)]
