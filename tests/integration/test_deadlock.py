"""The reference's deadlock test: one slow stream must not stall the others.

A bidi stream whose consumer does not read keeps its window full (flow
control on) or lets data pile up (off).  Ten other streams on the same
tunnel must all complete while it is still blocked; then the slow consumer
is released and its stream completes too.  Both directions: a slow client
reading server messages, and a slow handler reading client messages.
"""

from __future__ import annotations

import asyncio

import grpclib.server
import pytest
from grpclib.const import Cardinality

from tests.integration.support import (
    FLOW_CONTROL,
    TEST_TIMEOUT,
    Latch,
    Probe,
    all_kinds,
    fc_id,
    options,
    probe_call,
    serving,
    tunnel_over,
)
from tunnel import TunnelServiceHandler
from tunnel.testing import TestService
from tunnel.testing._pb.grpchantesting import Message

CHUNK = b"\x07" * 16_000
#: Far more than one window (65536 bytes) of messages.
MESSAGES = 64


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_slow_client_reader_does_not_stall_other_streams(disable_fc: bool) -> None:
    sending = Latch()  # the handler is about to send message n
    handler_done = asyncio.Event()

    async def flood(stream: grpclib.server.Stream[Message, Message]) -> None:
        await stream.recv_message()
        for n in range(MESSAGES):
            sending.hit()
            await stream.send_message(Message(payload=CHUNK, count=n))
        handler_done.set()

    opts = options(disable_flow_control=disable_fc)
    service = TunnelServiceHandler([TestService(), Probe(Flood=(Cardinality.STREAM_STREAM, flood))])
    release = asyncio.Event()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([service]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):

        async def slow_consumer() -> list[int]:
            async with probe_call(channel, "Flood", Cardinality.STREAM_STREAM) as stream:
                await stream.send_message(Message(), end=True)
                await release.wait()
                return [m.count async for m in stream]

        slow = asyncio.create_task(slow_consumer())
        if disable_fc:
            # No windows: everything is sent and buffered at the client.
            await handler_done.wait()
        else:
            # The handler fills the window and then waits for it.
            await sending.wait(5)
        await asyncio.gather(*(all_kinds(channel, bytes([i])) for i in range(10)))

        assert not slow.done()
        if not disable_fc:
            assert not handler_done.is_set()
            assert sending.count < MESSAGES
        release.set()
        assert await slow == list(range(MESSAGES))


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_slow_handler_reader_does_not_stall_other_streams(disable_fc: bool) -> None:
    release = asyncio.Event()
    started = asyncio.Event()

    async def sink(stream: grpclib.server.Stream[Message, Message]) -> None:
        started.set()
        await release.wait()
        count = 0
        async for _ in stream:
            count += 1
        await stream.send_message(Message(count=count))

    opts = options(disable_flow_control=disable_fc)
    service = TunnelServiceHandler([TestService(), Probe(Sink=(Cardinality.STREAM_STREAM, sink))])
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([service]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        sent = Latch()

        async def fast_producer() -> list[int]:
            async with probe_call(channel, "Sink", Cardinality.STREAM_STREAM) as stream:
                for _ in range(MESSAGES):
                    await stream.send_message(Message(payload=CHUNK))
                    sent.hit()
                await stream.end()
                return [m.count async for m in stream]

        producer = asyncio.create_task(fast_producer())
        await started.wait()
        if disable_fc:
            # Nothing holds the sender back; the handler's side buffers it all.
            await sent.wait(MESSAGES)
        else:
            await sent.wait(4)
        await asyncio.gather(*(all_kinds(channel, bytes([i])) for i in range(10)))

        if not disable_fc:
            # Still blocked on the handler's full window.
            assert sent.count < MESSAGES
            assert not producer.done()
        release.set()
        assert await producer == [MESSAGES]
