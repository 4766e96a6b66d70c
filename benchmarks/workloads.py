"""The measurements, written once against :class:`Client`.

Every transport (direct grpclib, our tunnels, grpcio, grpctunnel-py) runs
the same three methods of ``grpchantesting.TestService``, implemented by
the benchmark's own servers (``grpclib_side``, ``grpcio_side``):

* ``Unary`` echoes its request;
* ``ServerStream`` sends ``count`` copies of the request's payload;
* ``BidiStream`` echoes every request, and counts how many of its calls are
  in flight (:data:`LIVE`), so the 1,000-stream run can report how many
  streams were really open at once.

Client and server run in one process, on one event loop, over loopback TCP
(see docs/benchmarks.md for why).  Figures are wall-clock; RSS comes from
/proc/self.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import statistics
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

UNARY_PAYLOAD = b"x" * 16
STREAM_PAYLOAD = b"s" * 100
BULK_PAYLOAD = b"b" * (1024 * 1024)
MiB = 1024 * 1024


@dataclass(frozen=True)
class Budget:
    """How long each measurement runs."""

    warmup: float  # seconds of calls before measuring
    duration: float  # seconds of calls measured
    stream_count: int  # messages per ServerStream call
    bulk_messages: int  # 1 MiB messages per bulk run
    many_streams: int  # concurrent streams on one tunnel
    idle_tunnels: int  # tunnels held open for the memory figure
    idle_streams: int  # streams held open for the memory figure
    profile_calls: int  # unary calls under cProfile
    mix_seconds: float  # seconds of the reference's SendRPCs load (5 in the reference)
    profile_bulk_messages: int  # 1 MiB messages echoed under cProfile


FULL = Budget(0.5, 2.0, 1000, 48, 1000, 1000, 100, 2000, 5.0, 16)
QUICK = Budget(0.1, 0.3, 200, 8, 200, 100, 50, 200, 0.5, 2)


class Bidi(Protocol):
    async def send(self, payload: bytes) -> None: ...
    async def recv(self) -> bytes: ...


class Client(Protocol):
    """What a transport provides to the workloads."""

    async def unary(self, payload: bytes) -> None: ...

    async def server_stream(self, count: int, payload: bytes) -> int:
        """Call ServerStream; return how many messages arrived."""
        ...

    def bidi(self) -> contextlib.AbstractAsyncContextManager[Bidi]:
        """Open a BidiStream call; leaving the block half-closes and drains it."""
        ...


class Live:
    """How many BidiStream handlers run now, and the most at once."""

    def __init__(self) -> None:
        self.now = 0
        self.peak = 0

    def enter(self) -> None:
        self.now += 1
        self.peak = max(self.peak, self.now)

    def exit(self) -> None:
        self.now -= 1


LIVE = Live()


# -- memory ---------------------------------------------------------------------------


def rss() -> int:
    """Resident set size of this process, in bytes."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def settled_rss() -> int:
    gc.collect()
    return rss()


def reset_peak_rss() -> bool:
    """Reset VmHWM (Linux >= 4.0); False if this kernel does not allow it."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def peak_rss() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status")


# -- throughput and latency -----------------------------------------------------------


def _percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, round(q * (len(sorted_values) - 1)))
    return sorted_values[index]


async def _timed_loop(
    op: Callable[[], Awaitable[Any]], seconds: float, latencies: list[float] | None
) -> int:
    """Run *op* back to back for *seconds*; return how many completed."""
    clock = time.perf_counter
    end = clock() + seconds
    done = 0
    while True:
        start = clock()
        if start >= end:
            return done
        await op()
        if latencies is not None:
            latencies.append(clock() - start)
        done += 1


async def unary(
    client: Client,
    budget: Budget,
    callers: int,
    measuring: Callable[[], None] | None = None,
) -> dict[str, float]:
    """Unary calls/s and latency percentiles with *callers* concurrent callers.

    ``measuring`` is called when the warm-up is over and the measure starts.
    """

    async def call() -> None:
        await client.unary(UNARY_PAYLOAD)

    await asyncio.gather(*(_timed_loop(call, budget.warmup, None) for _ in range(callers)))
    if measuring is not None:
        measuring()
    latencies: list[float] = []
    start = time.perf_counter()
    counts = await asyncio.gather(
        *(_timed_loop(call, budget.duration, latencies) for _ in range(callers))
    )
    elapsed = time.perf_counter() - start
    latencies.sort()
    return {
        "calls_per_s": sum(counts) / elapsed,
        "p50_us": _percentile(latencies, 0.50) * 1e6,
        "p99_us": _percentile(latencies, 0.99) * 1e6,
        "mean_us": statistics.fmean(latencies) * 1e6,
        "calls": sum(counts),
    }


async def server_stream(client: Client, budget: Budget) -> dict[str, float]:
    """Messages/s of ServerStream calls of ``stream_count`` 100-byte messages."""
    count = budget.stream_count
    received = 0

    async def call() -> None:
        nonlocal received
        got = await client.server_stream(count, STREAM_PAYLOAD)
        if got != count:
            raise AssertionError(f"ServerStream sent {got} messages, not {count}")
        received += got

    await _timed_loop(call, budget.warmup, None)
    received = 0
    start = time.perf_counter()
    await _timed_loop(call, budget.duration, None)
    elapsed = time.perf_counter() - start
    return {"msgs_per_s": received / elapsed, "messages": received}


async def echo_bulk(client: Client, n: int) -> float:
    """Seconds to echo *n* 1 MiB messages over one BidiStream call, pipelined.

    One task sends while another reads the echoes back.
    """
    start = time.perf_counter()
    async with client.bidi() as call:

        async def send() -> None:
            for _ in range(n):
                await call.send(BULK_PAYLOAD)

        sender = asyncio.ensure_future(send())
        try:
            for _ in range(n):
                if len(await call.recv()) != len(BULK_PAYLOAD):
                    raise AssertionError("bulk echo lost bytes")
            await sender
        finally:
            sender.cancel()
    return time.perf_counter() - start


async def bulk(client: Client, budget: Budget) -> dict[str, float]:
    """1 MiB messages echoed over one BidiStream, sender and receiver pipelined.

    Calls of ``bulk_messages`` messages each, until ``duration`` has passed;
    MiB/s counts each message once (it crosses the connection twice).
    """
    await echo_bulk(client, 2)
    n = budget.bulk_messages
    sent = 0
    elapsed = 0.0
    while sent == 0 or elapsed < budget.duration:
        elapsed += await echo_bulk(client, n)
        sent += n
    return {"mib_per_s": sent / elapsed, "messages": sent, "seconds": elapsed}


# -- many streams and memory ---------------------------------------------------------


@contextlib.asynccontextmanager
async def _held_streams(client: Client, n: int, release: asyncio.Event) -> AsyncIterator[None]:
    """Open *n* BidiStream calls, each with one message echoed; hold them until exit."""
    ready = 0
    all_ready = asyncio.Event()
    failures: list[BaseException] = []

    async def hold() -> None:
        nonlocal ready
        try:
            async with client.bidi() as call:
                await call.send(UNARY_PAYLOAD)
                await call.recv()
                ready += 1
                if ready == n:
                    all_ready.set()
                await release.wait()
        except BaseException as exc:
            failures.append(exc)
            all_ready.set()
            raise

    tasks = [asyncio.ensure_future(hold()) for _ in range(n)]
    try:
        await all_ready.wait()
        if failures:
            raise failures[0]
        yield
    finally:
        release.set()
        await asyncio.gather(*tasks, return_exceptions=True)


async def many_streams(client: Client, budget: Budget) -> dict[str, float]:
    """``many_streams`` BidiStream calls started at once on one channel.

    Each call sends one message, reads its echo, then half-closes; the call
    is done when the server's end of stream arrives.  Reports the wall time,
    the most calls the server had in flight at once, and the peak RSS growth.
    """
    n = budget.many_streams

    async def one() -> None:
        async with client.bidi() as call:
            await call.send(UNARY_PAYLOAD)
            await call.recv()

    await asyncio.gather(*(one() for _ in range(10)))
    before = settled_rss()
    peak_ok = reset_peak_rss()
    LIVE.peak = LIVE.now
    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)), return_exceptions=True)
    elapsed = time.perf_counter() - start
    errors = [r for r in results if isinstance(r, BaseException)]
    return {
        "completed": n - len(errors),
        "errors": len(errors),
        "first_error": repr(errors[0]) if errors else "",
        "seconds": elapsed,
        "peak_in_flight": LIVE.peak,
        "peak_rss_growth_mib": (peak_rss() - before) / MiB if peak_ok else float("nan"),
    }


async def idle_streams(client: Client, budget: Budget) -> dict[str, float]:
    """RSS growth per open, idle BidiStream call (both ends, one process)."""
    n = budget.idle_streams
    before = settled_rss()
    async with _held_streams(client, n, asyncio.Event()):
        after = settled_rss()
    return {"kib_per_stream": (after - before) / n / 1024, "streams": n}


Opener = Callable[[], contextlib.AbstractAsyncContextManager[Any]]


async def idle_tunnels(
    connect: Callable[[int], contextlib.AbstractAsyncContextManager[Opener]],
    budget: Budget,
    *,
    per_connection: int = 50,
) -> dict[str, float]:
    """RSS growth per idle tunnel (both ends, one process).

    ``connect(k)`` yields, once *k* connections are up and warm, an opener of
    one tunnel on the next connection in turn.  The baseline is taken after
    the connections are open, so the figure is the tunnel (with its carrying
    stream), not the TCP connection.  A direct transport's "tunnel" is one
    open, idle BidiStream call: the carrier a tunnel would ride on.
    """
    n = budget.idle_tunnels
    connections = -(-n // per_connection)
    async with connect(connections) as open_one, contextlib.AsyncExitStack() as stack:
        before = settled_rss()
        start = time.perf_counter()
        for _ in range(n):
            await stack.enter_async_context(open_one())
        opened = time.perf_counter() - start
        after = settled_rss()
    return {
        "kib_per_tunnel": (after - before) / n / 1024,
        "tunnels": n,
        "connections": connections,
        "open_seconds": opened,
    }


def held_stream(client: Client) -> contextlib.AbstractAsyncContextManager[None]:
    """One held BidiStream: what a direct transport counts as an idle "tunnel"."""
    return _held_streams(client, 1, asyncio.Event())
