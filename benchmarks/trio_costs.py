"""What trio code costs per call: ``python -m benchmarks.trio_costs``.

Two questions behind docs/trio.md, each answered in one process with rounds
that alternate between the variants (medians of the rounds):

* handlers on a device: a router calls a device over a reverse tunnel, both
  in one ``trio.run``; the device's Unary handler is asyncio code, or trio
  code that does nothing more, takes a trio lock, sleeps ``trio.sleep(0)``,
  or runs its work in a nursery.  Microseconds per call.
* GRPCLIB-NOTES section 8's anomaly: a plain grpclib server (no tunnel) on
  trio-asyncio whose handler makes one ``trio_as_aio`` call, against the
  same handler without it.  The note measured 4.2 ms against 0.87 ms.

Not part of ``make bench``: it explains a design choice rather than tracking
the library.  Rounds and duration: ``--rounds`` (5), ``--seconds`` (1.5).
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpclib.client
import grpclib.server
import trio
import trio_asyncio
from grpclib.const import Cardinality, Handler

import tunnel.trio

from .grpclib_side import SERVICE, _listening_socket
from .protos import generate, load
from .workloads import UNARY_PAYLOAD

_Work = Callable[[], Awaitable[None]]


class _Unary:
    """Unary echo whose handler runs ``work`` between receiving and replying."""

    def __init__(self, message: type, work: _Work | None) -> None:
        self._message = message
        self._work = work

    def __mapping__(self) -> dict[str, Handler]:
        m = self._message
        return {SERVICE + "Unary": Handler(self._unary, Cardinality.UNARY_UNARY, m, m)}

    async def _unary(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        if self._work is not None:
            await self._work()
        await stream.send_message(request)


async def _calls(call: Callable[[], Awaitable[Any]], seconds: float) -> float:
    """Microseconds per call, back to back, after a short warm-up."""
    for _ in range(50):
        await call()
    calls, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        await call()
        calls += 1
    return (time.perf_counter() - start) / calls * 1e6


def _handler_variants(pb: Any) -> dict[str, tuple[Any, bool]]:
    """name -> (servable, is trio code)."""
    lock = trio.Lock()

    async def with_lock() -> None:
        async with lock:
            pass

    async def with_sleep() -> None:
        await trio.sleep(0)

    async def with_nursery() -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(trio.sleep, 0)

    return {
        "asyncio handler": (_Unary(pb.Message, None), False),
        "trio handler": (_Unary(pb.Message, None), True),
        "trio handler, trio lock": (_Unary(pb.Message, with_lock), True),
        "trio handler, trio.sleep(0)": (_Unary(pb.Message, with_sleep), True),
        "trio handler, nursery": (_Unary(pb.Message, with_nursery), True),
    }


async def _device_round(pb: Any, servable: Any, is_trio: bool, seconds: float) -> float:
    handlers = [servable] if is_trio else [tunnel.trio.asyncio_handlers(servable)]
    router = tunnel.trio.TunnelServiceHandler()
    async with tunnel.trio.open_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(tunnel.trio.serve, [router])
        network = grpclib.client.Channel("127.0.0.1", port)
        device = tunnel.trio.ReverseTunnelServer(network, handlers)
        nursery.start_soon(device.serve_forever)
        channel = router.as_channel()
        await channel.wait_ready()
        method = grpclib.client.UnaryUnaryMethod(channel, SERVICE + "Unary", pb.Message, pb.Message)
        per_call = await _calls(lambda: method(pb.Message(payload=UNARY_PAYLOAD)), seconds)
        nursery.cancel_scope.cancel()
    network.close()
    return per_call


async def _anomaly_round(pb: Any, hop: bool, seconds: float) -> float:
    async def trio_work() -> None:
        await trio.sleep(0)

    async def one_hop() -> None:
        await trio_asyncio.trio_as_aio(trio_work)()

    async def calls() -> float:
        server = grpclib.server.Server([_Unary(pb.Message, one_hop if hop else None)])
        sock = _listening_socket()
        port = sock.getsockname()[1]
        await server.start(sock=sock)
        channel = grpclib.client.Channel("127.0.0.1", port)
        method = grpclib.client.UnaryUnaryMethod(channel, SERVICE + "Unary", pb.Message, pb.Message)
        try:
            return await _calls(lambda: method(pb.Message(payload=UNARY_PAYLOAD)), seconds)
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    async with trio_asyncio.open_loop():
        result: float = await trio_asyncio.aio_as_trio(calls)()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.trio_costs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        pb, _ = load(Path(tmp))
        variants = _handler_variants(pb)
        device: dict[str, list[float]] = {name: [] for name in variants}
        anomaly: dict[str, list[float]] = {"no hop": [], "one trio_as_aio hop": []}
        for _ in range(args.rounds):
            for name, (servable, is_trio) in variants.items():
                device[name].append(trio.run(_device_round, pb, servable, is_trio, args.seconds))
            for name, hop in (("no hop", False), ("one trio_as_aio hop", True)):
                anomaly[name].append(trio.run(_anomaly_round, pb, hop, args.seconds))
    print("device over a reverse tunnel, called from trio (µs per unary call, median):")
    base = statistics.median(device["asyncio handler"])
    for name, values in device.items():
        median = statistics.median(values)
        print(f"  {name:30s} {median:7.0f}  (+{median - base:5.0f})")
    print("plain grpclib server on trio-asyncio, asyncio client (µs per call, median):")
    for name, values in anomaly.items():
        print(f"  {name:30s} {statistics.median(values):7.0f}")


if __name__ == "__main__":
    main()
