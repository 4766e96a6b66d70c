"""One transport's measurements, in a process of its own.

``python -m benchmarks.child --transport forward --loop asyncio --budget full
--pb-dir DIR --out FILE --steps unary_1,bulk`` writes one JSON object to
FILE.  A measurement that fails is recorded with its error and the others
still run.

The parent gives each memory measurement a process of its own: memory that
an earlier measurement freed stays with Python's allocator, and a later one
reusing it would show no growth in RSS.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import platform
import sys
import time
import traceback
from collections.abc import Awaitable, Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from . import protos, workloads
from .workloads import FULL, QUICK, Budget

#: No single measurement may take longer than this (seconds).
STEP_TIMEOUT = 90.0
#: The transports of ``benchmarks.grpclib_side``.
GRPCLIB_KINDS = ("direct", "forward", "reverse", "forward-wide")


def _version(dist: str) -> str | None:
    try:
        return metadata.version(dist)
    except metadata.PackageNotFoundError:
        return None


async def _step(
    results: dict[str, Any], name: str, run: Callable[[], Awaitable[dict[str, Any]]]
) -> None:
    start = time.perf_counter()
    try:
        async with asyncio.timeout(STEP_TIMEOUT):
            results[name] = await run()
    except Exception as exc:
        results[name] = {"error": f"{type(exc).__name__}: {exc}"}
        traceback.print_exc(file=sys.stderr)
    print(f"  {name}: {time.perf_counter() - start:.1f} s", file=sys.stderr, flush=True)


async def _measure(args: argparse.Namespace, budget: Budget) -> dict[str, Any]:
    from .profiling import profile_bulk, profile_unary

    results: dict[str, Any] = {}
    pb_dir = Path(args.pb_dir)
    setup: Any
    if args.transport == "router":
        from . import router_side

        pb, _ = protos.load(pb_dir)
        return await router_side.measure(pb_dir, pb, budget)
    if args.transport == "replicas":
        from . import registry_side

        pb, _ = protos.load(pb_dir)
        return await registry_side.measure(pb_dir, pb, budget)
    more: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}
    if args.transport in GRPCLIB_KINDS:
        from . import grpclib_side

        pb, _ = protos.load(pb_dir)
        context = grpclib_side.transport(args.transport, pb)
        # The mix serves another service (tunnel.testing's): a setup of its own.
        more["mix"] = functools.partial(grpclib_side.mix, args.transport, pb, budget.mix_seconds)
    else:
        from . import grpcio_side

        pb, pb_grpc = protos.load(pb_dir, grpc=True)
        assert pb_grpc is not None
        context = grpcio_side.transport(args.transport, pb, pb_grpc)

    steps: dict[str, Callable[[], Awaitable[dict[str, Any]]]] = {}
    async with context as setup:
        client = setup.client
        steps = {
            "idle_streams": lambda: workloads.idle_streams(client, budget),
            "idle_tunnels": lambda: workloads.idle_tunnels(setup.connect, budget),
            "many_streams": lambda: workloads.many_streams(client, budget),
            "unary_1": lambda: workloads.unary(client, budget, 1),
            "unary_16": lambda: workloads.unary(client, budget, 16),
            "server_stream": lambda: workloads.server_stream(client, budget),
            "bulk": lambda: workloads.bulk(client, budget),
            "profile": lambda: profile_unary(client, budget.profile_calls),
            "profile_bulk": lambda: profile_bulk(client, budget.profile_bulk_messages),
            **more,
        }
        for name in args.steps.split(","):
            await _step(results, name, steps[name])
    return results


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--transport", required=True)
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--budget", choices=("full", "quick"), default="full")
    parser.add_argument("--pb-dir", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--steps", required=True, help="comma-separated measurements, in order")
    args = parser.parse_args()
    budget = QUICK if args.budget == "quick" else FULL

    output: dict[str, Any] = {
        "transport": args.transport,
        "loop": args.loop,
        "python": platform.python_version(),
        "versions": {
            dist: _version(dist)
            for dist in ("grpclib", "protobuf", "grpcio", "grpctunnel-py", "uvloop")
        },
        "rss_at_start_mib": workloads.rss() / workloads.MiB,
    }
    try:
        if args.loop == "uvloop":
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        else:
            runner = asyncio.Runner()
        with runner:
            output["results"] = runner.run(_measure(args, budget))
    except Exception as exc:
        traceback.print_exc(file=sys.stderr)
        output["error"] = f"{type(exc).__name__}: {exc}"
    output["rss_at_end_mib"] = workloads.rss() / workloads.MiB
    Path(args.out).write_text(json.dumps(output, indent=1))
    sys.stdout.flush()
    sys.stderr.flush()
    # grpcio's threads can keep a finished process alive; everything worth
    # keeping is written.
    os._exit(0)


if __name__ == "__main__":
    main()
