"""Churn leaves nothing behind: tunnels opened and closed, calls cancelled mid-way.

A long-running process opens and closes tunnels and cancels calls all day.
After a warm-up, a thousand more tunnels (or ten thousand more cancelled
calls) must leave the number of tasks where it was and memory within a
small allowance: a leak of even a few hundred bytes per tunnel or call would
exceed it.

Memory is traced with ``tracemalloc`` (only what is still reachable counts),
leaving out h2's record of closed HTTP/2 streams, which h2 keeps on purpose
(up to 65,536 per connection) and which a plain grpclib call leaves too.
"""

from __future__ import annotations

import asyncio
import gc
import os
import tracemalloc
from collections.abc import Awaitable, Callable

import grpclib.client

import tunnel
from tests.integration.support import Blocking, call_until_it_ends, serving

#: Bytes that may stay allocated after the measured rounds (caches, interning).
ALLOWANCE = 200_000


NOT_H2 = [tracemalloc.Filter(False, "*/h2/*"), tracemalloc.Filter(False, "*/hyperframe/*")]


async def settled() -> tuple[int, int]:
    """Tasks alive and bytes traced, once what is over has been collected."""
    for _ in range(20):
        await asyncio.sleep(0)
    gc.collect()
    snapshot = tracemalloc.take_snapshot().filter_traces(NOT_H2)
    return len(asyncio.all_tasks()), sum(stat.size for stat in snapshot.statistics("filename"))


async def grows(
    round_: Callable[[], Awaitable[None]], *, warm_up: int, rounds: int
) -> tuple[int, int]:
    """(tasks, bytes) left over by *rounds* more rounds after *warm_up* rounds."""
    for _ in range(warm_up):
        await round_()
    tracemalloc.start()
    try:
        tasks_before, bytes_before = await settled()
        for _ in range(rounds):
            await round_()
        tasks_after, bytes_after = await settled()
    finally:
        tracemalloc.stop()
    return tasks_after - tasks_before, bytes_after - bytes_before


async def test_a_thousand_tunnels_opened_and_closed() -> None:
    handler = tunnel.TunnelServiceHandler([Blocking().service()])
    async with asyncio.timeout(120), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:

            async def open_and_close() -> None:
                channel = await tunnel.open_tunnel(direct)
                await channel.aclose()

            tasks, leaked = await grows(open_and_close, warm_up=100, rounds=1000)
            assert tasks == 0
            assert leaked < ALLOWANCE, f"{leaked} bytes still allocated after 1000 tunnels"
        finally:
            direct.close()


def resident_bytes() -> int:
    """This process's resident set size (Linux)."""
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


#: RSS growth allowed over 10,000 calls: 400 bytes a call.  (Tracing every
#: allocation of 10,000 calls would take a minute; the process's size after
#: a warm-up, plus the tunnel's own tables, tells the same story.)
RSS_ALLOWANCE = 4_000_000


async def test_ten_thousand_calls_cancelled_mid_way() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(120), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                started = 0

                async def cancelled_calls(n: int) -> None:
                    """*n* calls at once, each cancelled once it reached its handler."""
                    nonlocal started
                    calls = [
                        asyncio.create_task(call_until_it_ends(channel, "BidiStream"))
                        for _ in range(n)
                    ]
                    started += n
                    await blocking.started.wait(started)
                    for call in calls:
                        call.cancel()
                    await asyncio.gather(*calls, return_exceptions=True)

                for _ in range(50):
                    await cancelled_calls(20)
                tasks_before, _ = await settled_tasks()
                rss_before = resident_bytes()
                for _ in range(500):
                    await cancelled_calls(20)
                tasks_after, _ = await settled_tasks()
                grown = resident_bytes() - rss_before
                assert tasks_after == tasks_before
                assert grown < RSS_ALLOWANCE, f"RSS grew {grown} bytes over 10000 calls"
                # Every cancellation reached its handler, and both ends forgot every stream.
                async with asyncio.timeout(10):
                    await blocking.cancelled.wait(started)
                    while handler._tunnels and next(iter(handler._tunnels)).core._streams:
                        await asyncio.sleep(0.01)
                client = channel._tunnel
                assert client.calls == {} and client.core._streams == {}
        finally:
            direct.close()


async def settled_tasks() -> tuple[int, None]:
    for _ in range(20):
        await asyncio.sleep(0)
    gc.collect()
    return len(asyncio.all_tasks()), None
