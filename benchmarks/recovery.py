"""``python -m benchmarks.recovery``: how long recovery takes, with real processes.

Each scenario runs peers as processes of their own (``tests/field/peer.py``,
which uses keepalive 1 s + 1 s), kills or restarts them by PID, and times
what a user would notice:

- *drop to UNAVAILABLE*: a call blocked in a peer's handler, the peer killed
  with SIGKILL: time until the call fails (forward: the network server
  killed; reverse: the device killed);
- *silence to UNAVAILABLE*: the path goes silent (a proxy stops forwarding
  without closing), with the default keepalive (30 s + 20 s) and with
  1 s + 1 s: time until a call in flight fails;
- *restart to first call*: the network server killed and started again on
  the same port: time from its restart until the first successful call, for
  a device under ``serve_forever`` (through the restarted server's pool) and
  for a ``ReconnectingTunnelChannel`` (``wait_for_ready``).

Prints a Markdown table; ``--skip-default-keepalive`` leaves out the
scenario that waits the default 50 s.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import grpclib.client
from grpclib.exceptions import GRPCError

import tunnel
from tests.field.test_processes import network_server, peer, reached
from tests.integration.support import Proxy
from tests.reverse.support import Device, key_from_metadata, router, who

ROUNDS = 3


async def timed(until: Callable[[], Awaitable[object]], limit: float = 120.0) -> float:
    started = time.monotonic()
    async with asyncio.timeout(limit):
        await until()
    return time.monotonic() - started


async def fails(call: Awaitable[object]) -> None:
    try:
        await call
    except GRPCError:
        return
    raise AssertionError("the call did not fail")


async def forward_kill() -> float:
    async with network_server() as (server, port):
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                call = await reached(channel)
                blocked = asyncio.ensure_future(anext(call))
                server.kill()
                return await timed(lambda: fails(blocked))
        finally:
            direct.close()


async def reverse_kill() -> float:
    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    async with (
        router(handler) as net,
        peer("device", "--port", str(net.port), "--key", "k") as device,
    ):
        await device.line()
        pool = handler.key_as_channel("k")
        await pool.wait_ready()
        call = await reached(pool)
        blocked = asyncio.ensure_future(anext(call))
        device.kill()
        return await timed(lambda: fails(blocked))


async def silence(options: tunnel.TunnelOptions) -> float:
    handler = tunnel.TunnelServiceHandler([Device("server")], options=options)
    async with router(handler) as net, Proxy(net.port) as proxy:
        direct = grpclib.client.Channel("127.0.0.1", proxy.port)
        try:
            async with tunnel.open_tunnel(direct, options=options) as channel:
                call = await reached(channel)
                blocked = asyncio.ensure_future(anext(call))
                proxy.freeze()
                return await timed(lambda: fails(blocked))
        finally:
            direct.close()


async def device_restart() -> float:
    async with network_server() as (server, port), peer("device", "--port", str(port)) as device:
        await device.line()
        server.kill()
        async with network_server(port):
            return await timed(device.line)


async def channel_restart() -> float:
    async with network_server() as (server, port):
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.ReconnectingTunnelChannel(
                direct, wait_for_ready=True, min_backoff=0.05, max_backoff=0.5
            ) as channel:
                await who(channel)
                server.kill()
                async with network_server(port):
                    return await timed(lambda: who(channel))
        finally:
            direct.close()


@contextlib.asynccontextmanager
async def quiet() -> AsyncIterator[None]:
    import logging

    logging.getLogger("tunnel").setLevel(logging.CRITICAL)
    yield


async def main(skip_default: bool) -> None:
    fast = tunnel.TunnelOptions(keepalive_interval=1.0, keepalive_timeout=1.0)
    scenarios: list[tuple[str, Callable[[], Awaitable[float]], int]] = [
        ("forward: network server killed (SIGKILL), call to UNAVAILABLE", forward_kill, ROUNDS),
        ("reverse: device killed (SIGKILL), call to UNAVAILABLE", reverse_kill, ROUNDS),
        (
            "forward: path silent, keepalive 1 s + 1 s, call to UNAVAILABLE",
            lambda: silence(fast),
            ROUNDS,
        ),
    ]
    if not skip_default:
        scenarios.append(
            (
                "forward: path silent, default keepalive (30 s + 20 s), call to UNAVAILABLE",
                lambda: silence(tunnel.TunnelOptions()),
                1,
            )
        )
    scenarios += [
        ("device (serve_forever): server restarted, to tunnel open again", device_restart, ROUNDS),
        ("ReconnectingTunnelChannel: server restarted, to first call", channel_restart, ROUNDS),
    ]
    print("| scenario | seconds (each run) |")
    print("|---|---|")
    async with quiet():
        for name, scenario, rounds in scenarios:
            results = [await scenario() for _ in range(rounds)]
            print(f"| {name} | {', '.join(f'{r:.3f}' for r in results)} |", flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--skip-default-keepalive", action="store_true")
    asyncio.run(main(parser.parse_args().skip_default_keepalive))
