"""The replica rows: the peer hop between routers, and the registry in Redis.

Two measurements, both against a real ``redis-server`` (from the
distribution; without it the rows say so):

* **The peer hop.**  Processes on 127.0.0.1: redis-server, the benchmark
  backend, two ``grpctunnel router --registry`` replicas and one agent on
  the second.  This child is the caller: first through the router that
  holds the key (caller -> r2 -> agent -> backend), then through the other
  one (caller -> r1 -> r2 -> agent -> backend), against the same processes;
  the difference is what crossing the peer hop costs.
* **The registry at 10,000 keys.**  Three routers' stores
  (``tunnel.cli._redis.RedisStore``) in this process, each holding a third
  of 10,000 keys in the same redis-server.  A refresh writes every key of
  a router once (one Lua script per key, pipelined): the time of a round
  over all three routers gives the Redis operations per second a refresh
  sustains, and the steady load it puts on Redis at the default TTL; then
  lookups of random keys, one at a time, give the latency of the lookup a
  call for a remote key makes.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpclib.client

from .router_side import KEY, Children, _rates
from .workloads import Budget

#: Keys spread over the three routers' stores.
KEYS = 10_000
ROUTERS = 3
#: The routers' default --registry-ttl: a refresh every third of it.
DEFAULT_TTL = 30.0
LOOKUPS = 5_000
SECRET = "bench-peer-secret"


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextlib.contextmanager
def _redis_server() -> Any:
    binary = shutil.which("redis-server")
    if binary is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    port = _free_port()
    process = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
         "--daemonize", "no", "--loglevel", "warning"],
        stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                import socket

                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    break
            except OSError:
                if time.monotonic() > deadline or process.poll() is not None:
                    raise RuntimeError("redis-server did not start") from None
                time.sleep(0.02)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait()


@contextlib.asynccontextmanager
async def _replicas(pb_dir: Path, url: str) -> AsyncIterator[tuple[int, int, dict[str, int]]]:
    """Backend, two routers sharing ``url``, an agent on the second; (r1, r2 port, pids)."""
    with tempfile.TemporaryDirectory(prefix="tunnel-registry-bench-") as tmp:
        secret = Path(tmp, "peer.secret")
        secret.write_text(SECRET)
        children = Children(Path(tmp))
        try:
            backend, backend_port = await children.backend(pb_dir)
            peering = ("--peer-listen", "127.0.0.1:0", "--peer-secret-file", str(secret))
            shared = ("--registry", url, *peering)
            r1, r1_port = await children.router("r1", "--router-id", "r1", *shared)
            r2, r2_port = await children.router("r2", "--router-id", "r2", *shared)
            agent = children.agent(r2_port, backend_port)
            opened = json.loads(await r2.line('"tunnel_opened"'))
            if not opened.get("registered"):
                raise RuntimeError("the agent's key did not reach the registry")
            pids = {
                "backend": backend.process.pid,
                "agent": agent.process.pid,
                "r1": r1.process.pid,
                "r2": r2.process.pid,
            }
            yield r1_port, r2_port, pids
        finally:
            children.stop()


async def peer_hop(pb_dir: Path, pb: ModuleType, budget: Budget, url: str) -> dict[str, Any]:
    from .grpclib_side import GrpclibClient

    async with _replicas(pb_dir, url) as (r1_port, r2_port, pids):
        results: dict[str, Any] = {"pids": pids}
        for name, port in (("local", r2_port), ("peer", r1_port)):
            channel = grpclib.client.Channel("127.0.0.1", port)
            try:
                client = GrpclibClient(channel, pb, {"tunnel-key": KEY})
                results[name] = await _rates(client, budget)
            finally:
                channel.close()
        return results


async def registry_load(url: str, keys_count: int = KEYS, lookups: int = LOOKUPS) -> dict[str, Any]:
    """``keys_count`` keys over three routers' stores: refresh rate, lookup latency."""
    from tunnel.cli._redis import RedisStore
    from tunnel.cli._registry import Holder, Holding

    stores = [RedisStore.from_url(url) for _ in range(ROUTERS)]
    try:
        holders = [Holder(f"r{i}", f"127.0.0.1:{7000 + i}") for i in range(ROUTERS)]
        keys = [f"device-{i:05d}" for i in range(keys_count)]
        held: list[list[Holding]] = [[] for _ in range(ROUTERS)]
        started = time.perf_counter()
        for i, key in enumerate(keys):
            router = i % ROUTERS
            gen = await stores[router].hold(
                key, holders[router], f"agent-{i}", DEFAULT_TTL, claim=False
            )
            held[router].append(Holding(key, f"agent-{i}", gen=gen or 0))
        register_s = time.perf_counter() - started

        rounds = []
        for _ in range(3):
            started = time.perf_counter()
            await asyncio.gather(
                *(
                    store.refresh(held[i], holders[i], DEFAULT_TTL, claim=False)
                    for i, store in enumerate(stores)
                )
            )
            rounds.append(time.perf_counter() - started)
        refresh_s = statistics.median(rounds)
        # Per router and round: one script per key, then two commands.
        operations = keys_count + 2 * ROUTERS

        latencies = []
        pick = random.Random(1)
        for _ in range(lookups):
            key = keys[pick.randrange(keys_count)]
            started = time.perf_counter()
            found = await stores[0].lookup(key)
            latencies.append(time.perf_counter() - started)
            if len(found) != 1:
                raise RuntimeError(f"lookup of {key} found {found}")
        latencies.sort()
        return {
            "keys": keys_count,
            "routers": ROUTERS,
            "register_s": register_s,
            "refresh_round_s": refresh_s,
            "refresh_ops_per_s": operations / refresh_s,
            "steady_ops_per_s": operations / (DEFAULT_TTL / 3),
            "lookups": lookups,
            "lookup_p50_us": latencies[len(latencies) // 2] * 1e6,
            "lookup_p99_us": latencies[int(len(latencies) * 0.99)] * 1e6,
        }
    finally:
        for store in stores:
            await store.aclose()


async def measure(pb_dir: Path, pb: ModuleType, budget: Budget) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with _redis_server() as url:
        try:
            results["hop"] = await peer_hop(pb_dir, pb, budget, url)
        except Exception as exc:
            results["hop"] = {"error": f"{type(exc).__name__}: {exc}"}
        try:
            # The quick (smoke) run checks that it works, on fewer keys.
            quick = budget.duration < 1
            results["registry"] = await registry_load(
                url, KEYS // 10 if quick else KEYS, LOOKUPS // 10 if quick else LOOKUPS
            )
        except Exception as exc:
            results["registry"] = {"error": f"{type(exc).__name__}: {exc}"}
    return results
