"""What trio code costs per call: ``python -m benchmarks.trio_costs``.

Two questions behind docs/trio.md, each answered in one process with rounds
that alternate between the variants (medians of the rounds):

* handlers on a device: a router calls a device over a reverse tunnel, both
  in one ``trio.run``; the device's Unary handler is asyncio code, or trio
  code that does nothing more, takes a trio lock, sleeps ``trio.sleep(0)``,
  or runs its work in a nursery.  Microseconds per call.
* callers over a forward tunnel: the design ``tunnel.trio`` uses (the trio
  task drives the call, no crossing per operation) against the facade it
  replaced in the design phase (one ``aio_as_trio`` crossing per stream
  operation: enter, send, receive, exit), and plain asyncio.
* GRPCLIB-NOTES section 8's anomaly: a plain grpclib server (no tunnel) on
  trio-asyncio whose handler makes one ``trio_as_aio`` call, against the
  same handler without it.  The note measured 4.2 ms against 0.87 ms.

Not part of ``make bench``: it explains a design choice rather than tracking
the library.  Rounds and duration: ``--rounds`` (5), ``--seconds`` (1.5).
"""

from __future__ import annotations

import argparse
import asyncio
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


def _unary_method(channel: Any, pb: Any) -> Any:
    return grpclib.client.UnaryUnaryMethod(channel, SERVICE + "Unary", pb.Message, pb.Message)


async def _calls(call: Callable[[], Awaitable[Any]], seconds: float) -> float:
    return await _async_calls(call, seconds)


async def _async_calls(call: Callable[[], Awaitable[Any]], seconds: float) -> float:
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
        method = _unary_method(channel, pb)
        per_call = await _calls(lambda: method(pb.Message(payload=UNARY_PAYLOAD)), seconds)
        nursery.cancel_scope.cancel()
    network.close()
    return per_call


class _HopStream:
    """A stream whose every operation is one ``aio_as_trio`` crossing (the rejected facade)."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    async def __aenter__(self) -> _HopStream:
        await trio_asyncio.aio_as_trio(self._stream.__aenter__)()
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await trio_asyncio.aio_as_trio(self._stream.__aexit__)(*exc_info)

    async def send_message(self, message: Any, *, end: bool = False) -> None:
        await trio_asyncio.aio_as_trio(self._stream.send_message)(message, end=end)

    async def recv_message(self) -> Any:
        return await trio_asyncio.aio_as_trio(self._stream.recv_message)()


class _HopChannel:
    def __init__(self, channel: Any) -> None:
        self._channel = channel

    def request(self, *args: Any, **kwargs: Any) -> _HopStream:
        return _HopStream(self._channel.request(*args, **kwargs))


async def _caller_round(pb: Any, how: str, seconds: float) -> float:
    if how == "asyncio":
        return await trio_asyncio.aio_as_trio(_asyncio_caller)(pb, seconds)
    servable = tunnel.trio.asyncio_handlers(_Unary(pb.Message, None))
    async with trio.open_nursery() as nursery:
        port = await nursery.start(
            tunnel.trio.serve, [tunnel.trio.TunnelServiceHandler([servable])]
        )
        network = grpclib.client.Channel("127.0.0.1", port)
        async with tunnel.trio.open_tunnel(network) as channel:
            target: Any = channel if how == "trio" else _HopChannel(channel.aio)
            method = grpclib.client.UnaryUnaryMethod(
                target, SERVICE + "Unary", pb.Message, pb.Message
            )
            per_call = await _calls(lambda: method(pb.Message(payload=UNARY_PAYLOAD)), seconds)
        network.close()
        nursery.cancel_scope.cancel()
    return per_call


async def _asyncio_caller(pb: Any, seconds: float) -> float:
    server = grpclib.server.Server([tunnel.TunnelServiceHandler([_Unary(pb.Message, None)])])
    sock = _listening_socket()
    await server.start(sock=sock)
    network = grpclib.client.Channel("127.0.0.1", sock.getsockname()[1])
    try:
        async with tunnel.open_tunnel(network) as channel:
            method = grpclib.client.UnaryUnaryMethod(
                channel, SERVICE + "Unary", pb.Message, pb.Message
            )
            return await _async_calls(lambda: method(pb.Message(payload=UNARY_PAYLOAD)), seconds)
    finally:
        network.close()
        server.close()
        await asyncio.wait_for(server.wait_closed(), 10)


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
        method = _unary_method(channel, pb)
        try:
            return await _calls(lambda: method(pb.Message(payload=UNARY_PAYLOAD)), seconds)
        finally:
            channel.close()
            server.close()
            await server.wait_closed()

    async with trio_asyncio.open_loop():
        result: float = await trio_asyncio.aio_as_trio(calls)()
    return result


async def _in_loop(func: Callable[..., Awaitable[float]], *args: Any) -> float:
    async with tunnel.trio.open_loop():
        return await func(*args)


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
        callers: dict[str, list[float]] = {
            "asyncio": [],
            "trio": [],
            "hop per operation": [],
        }
        for _ in range(args.rounds):
            for how in callers:
                callers[how].append(trio.run(_in_loop, _caller_round, pb, how, args.seconds))
            for name, (servable, is_trio) in variants.items():
                device[name].append(trio.run(_device_round, pb, servable, is_trio, args.seconds))
            for name, hop in (("no hop", False), ("one trio_as_aio hop", True)):
                anomaly[name].append(trio.run(_anomaly_round, pb, hop, args.seconds))
    print(
        "forward tunnel, one process (µs per unary call, median; rate vs asyncio): asyncio"
        " is the asyncio layer's own caller on the same trio-asyncio loop"
    )
    base = statistics.median(callers["asyncio"])
    for name, values in callers.items():
        median = statistics.median(values)
        print(f"  {name:30s} {median:7.0f}  ({base / median:.2f}x)")
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
