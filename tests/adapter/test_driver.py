"""The driver's writer, around a real protocol core, without a carrying call.

What the application consumed goes back to the peer as one ``window_update``
per stream per batch the writer sends: the sum of every acknowledgement since
its last batch, never one per chunk, and none for a stream that is over by
the time the writer runs (the core decides, as for any window update).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from google.protobuf.message import Message

from tests.core.helpers import BIDI, Pair
from tunnel._core.events import DataReceived
from tunnel._driver import Driver
from tunnel._pb.tunnel_pb2 import ClientToServer, ServerToClient
from tunnel._tasks import Flag, cancel_and_wait

BOUND = 5.0

ServerDriver = Driver[ClientToServer, ServerToClient]


class Wire:
    """The frames the writer sent, batch by batch."""

    def __init__(self) -> None:
        self.batches: list[list[ServerToClient]] = []

    async def send_batch(self, frames: Sequence[Message]) -> None:
        self.batches.append([f for f in frames if isinstance(f, ServerToClient)])

    async def send(self, frame: ServerToClient) -> None:
        self.batches.append([frame])

    def window_updates(self) -> list[list[int]]:
        return [
            [f.window_update for f in batch if f.WhichOneof("frame") == "window_update"]
            for batch in self.batches
        ]


async def never() -> ClientToServer | None:
    await asyncio.Event().wait()
    return None


@asynccontextmanager
async def server_writer(
    pair: Pair,
) -> AsyncIterator[tuple[Driver[ClientToServer, ServerToClient], Wire]]:
    wire = Wire()
    driver: ServerDriver = Driver(
        pair.server, pair.server.receive_frame, wire.send, never, wire.send_batch
    )
    writer = asyncio.create_task(driver.write_loop())
    try:
        yield driver, wire
    finally:
        await cancel_and_wait([writer])


def received_chunks(pair: Pair, size: int) -> tuple[int, list[int]]:
    """A bidi stream on which the server received ``size`` bytes: its id, the chunk sizes."""
    stream_id = pair.open(BIDI)
    pair.client.send_message(stream_id, b"x" * size)
    _, server_events = pair.pump()
    return stream_id, [len(e.data) for e in server_events if isinstance(e, DataReceived)]


async def test_what_was_consumed_between_two_batches_goes_back_as_one_update() -> None:
    pair = Pair()
    stream_id, chunks = received_chunks(pair, 40_000)
    assert len(chunks) == 3
    async with asyncio.timeout(BOUND), server_writer(pair) as (driver, wire):
        for n in chunks:
            driver.acknowledge(stream_id, n)
        await driver.drain()
        assert wire.window_updates() == [[40_000]]
        driver.acknowledge(stream_id, 5)
        await driver.drain()
        assert wire.window_updates() == [[40_000], [5]]


async def test_nothing_goes_back_for_a_stream_that_ended_before_the_writer_ran() -> None:
    pair = Pair()
    stream_id, chunks = received_chunks(pair, 20_000)
    async with asyncio.timeout(BOUND), server_writer(pair) as (driver, wire):
        for n in chunks:
            driver.acknowledge(stream_id, n)
        pair.server.close_stream(stream_id, None)  # over before the writer runs
        await driver.drain()
    assert wire.window_updates() == [[]]  # the close_stream went out alone


async def test_a_flag_wakes_every_task_waiting_when_it_is_set() -> None:
    flag = Flag()
    woken: list[int] = []

    async def waiter(n: int) -> None:
        await flag.wait()
        woken.append(n)

    async with asyncio.timeout(BOUND):
        tasks = [asyncio.create_task(waiter(n)) for n in range(3)]
        while len(flag._waiters or ()) < 3:
            await asyncio.sleep(0)
        assert not flag.is_set() and woken == []
        flag.set()
        flag.clear()  # cleared before they run: they were woken all the same
        await asyncio.gather(*tasks)
        assert sorted(woken) == [0, 1, 2]
        assert not flag.is_set()
        flag.set()
        await flag.wait()  # returns at once once set


async def test_a_cancelled_wait_leaves_no_waiter_behind() -> None:
    flag = Flag()
    async with asyncio.timeout(BOUND):
        waiting = asyncio.create_task(flag.wait())
        while not flag._waiters:
            await asyncio.sleep(0)
        await cancel_and_wait([waiting])
        assert waiting.cancelled()
        assert not flag._waiters
        flag.set()


async def test_a_sender_may_queue_one_window_the_peer_granted_before_it_waits() -> None:
    """64 KiB at least; the stream's own window when the peer granted more."""
    for window, queued, waits in [
        (65_536, 65_536, False),
        (65_536, 65_537, True),
        (1 << 20, 1 << 20, False),
        (1 << 20, (1 << 20) + 1, True),
    ]:
        pair = Pair(initial_window_size=window)
        stream_id = pair.open(BIDI)
        async with asyncio.timeout(BOUND), server_writer(pair) as (driver, _):
            pair.server.send_message(stream_id, b"x" * queued)
            assert pair.server.send_window(stream_id) == window
            assert driver.within_send_buffer(stream_id) is not waits
