"""Unary calls over a forward tunnel from trio, against the same from asyncio.

``python -m benchmarks.trio_side --budget full --pb-dir DIR --out FILE``
writes one JSON object.  In one process, rounds alternate: an asyncio round
(``asyncio.run``: the grpclib server with the tunnel handler and the client,
as the ``forward`` column measures) and trio rounds (``trio.run`` with
``tunnel.trio.open_loop()``: the same server, called from a trio task
through ``tunnel.trio.open_tunnel``, with the handler as asyncio code and
as trio code).  Alternating rounds and reporting medians keeps a change in
the machine's load from landing on one side only.  Server and client share
one loop (one core), as in every other benchmark.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import grpclib.client
import trio

import tunnel.trio

from . import grpclib_side, protos
from .workloads import FULL, QUICK, UNARY_PAYLOAD, Budget

#: Rounds of each side; the reported figure is the median round.
ROUNDS = {"full": 5, "quick": 2}


async def _unary_rate(client: grpclib_side.GrpclibClient, budget: Budget) -> float:
    """Unary calls/s, back to back, after a warm-up; awaited from asyncio or trio alike."""
    end = time.perf_counter() + budget.warmup
    while time.perf_counter() < end:
        await client.unary(UNARY_PAYLOAD)
    calls = 0
    start = time.perf_counter()
    end = start + budget.duration
    while time.perf_counter() < end:
        await client.unary(UNARY_PAYLOAD)
        calls += 1
    return calls / (time.perf_counter() - start)


async def _asyncio_round(pb: ModuleType, budget: Budget) -> float:
    async with grpclib_side.transport("forward", pb) as setup:
        return await _unary_rate(setup.client, budget)


async def _trio_round(pb: ModuleType, budget: Budget, trio_handler: bool) -> float:
    service = grpclib_side.BenchService(pb)
    handlers = [service] if trio_handler else [tunnel.trio.asyncio_handlers(service)]
    async with tunnel.trio.open_loop(), trio.open_nursery() as nursery:
        port = await nursery.start(tunnel.trio.serve, [tunnel.trio.TunnelServiceHandler(handlers)])
        network = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.trio.open_tunnel(network) as channel:
                rate = await _unary_rate(grpclib_side.GrpclibClient(channel, pb), budget)
        finally:
            network.close()
        nursery.cancel_scope.cancel()
    return rate


def measure(pb: ModuleType, budget: Budget, rounds: int) -> dict[str, Any]:
    sides: dict[str, list[float]] = {"asyncio": [], "trio": [], "trio_handler": []}
    for _ in range(rounds):
        sides["asyncio"].append(asyncio.run(_asyncio_round(pb, budget)))
        sides["trio"].append(trio.run(_trio_round, pb, budget, False))
        sides["trio_handler"].append(trio.run(_trio_round, pb, budget, True))
    medians = {side: statistics.median(rates) for side, rates in sides.items()}
    return {
        "rounds": sides,
        "calls_per_s": medians,
        "ratio_trio": medians["trio"] / medians["asyncio"],
        "ratio_trio_handler": medians["trio_handler"] / medians["asyncio"],
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--budget", choices=("full", "quick"), default="full")
    parser.add_argument("--pb-dir", required=True)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    pb, _ = protos.load(Path(args.pb_dir))
    budget = QUICK if args.budget == "quick" else FULL
    output: dict[str, Any] = {"transport": "trio"}
    try:
        output["results"] = measure(pb, budget, ROUNDS[args.budget])
    except Exception as exc:
        output["error"] = f"{type(exc).__name__}: {exc}"
        raise
    finally:
        Path(args.out).write_text(json.dumps(output, indent=1))
        sys.stdout.flush()


if __name__ == "__main__":
    main()
