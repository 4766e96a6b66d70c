"""The router rows: a caller through ``grpctunnel router`` and ``agent`` to a backend.

Unlike the other columns (everything in one process), these are the
product as deployed: four processes on 127.0.0.1, the backend (the
benchmark service, ``python -m benchmarks.router_side backend``), the
agent, the router, and this child as the caller.  The same child measures
the caller going to the backend directly first, then through router and
agent, against the same backend process, so the ratio is what the two
extra hops cost on this machine (2 cores shared by four processes).

``python -m benchmarks.router_side backend --pb-dir DIR`` serves the
benchmark service on a free port and prints ``listening HOST:PORT``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator
from pathlib import Path
from types import ModuleType
from typing import Any

import grpclib.client
import grpclib.server

from tunnel.testing.backend import serve_until_stopped

from . import protos, workloads
from .grpclib_side import BenchService, GrpclibClient
from .workloads import Budget

ROOT = Path(__file__).resolve().parent.parent
KEY = "bench"
#: Seconds a process may take to start.
STARTUP = 30.0


class _Child:
    """A process whose output goes to a file, read for the line we wait for."""

    def __init__(self, log: Path, *args: str) -> None:
        self.log = log
        with log.open("w") as out:
            self.process = subprocess.Popen(
                [sys.executable, *args],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=ROOT,
                env=dict(os.environ, PYTHONPATH=str(ROOT)),
            )

    async def line(self, match: str) -> str:
        """The first line containing ``match`` (polled: this is set-up, not the measure)."""
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            for line in self.log.read_text().splitlines():
                if match in line:
                    return line
            if self.process.poll() is not None:
                break
            await asyncio.sleep(0.05)
        raise RuntimeError(f"{self.log.name}: no {match!r}:\n{self.log.read_text()}")

    def stop(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            self.process.wait()


class Children:
    """The processes of a benchmark deployment, each logging to a file in ``tmp``.

    ``stop`` stops them last started first (callers before what they call).
    """

    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.started: list[_Child] = []

    def _start(self, log: str, *args: str) -> _Child:
        child = _Child(Path(self.tmp, log), *args)
        self.started.append(child)
        return child

    async def backend(self, pb_dir: Path) -> tuple[_Child, int]:
        """The benchmark service (``backend`` below), and its port."""
        child = self._start(
            "backend.log", "-m", "benchmarks.router_side", "backend", "--pb-dir", str(pb_dir)
        )
        return child, int((await child.line("listening ")).rpartition(":")[2])

    async def router(self, name: str, *flags: str) -> tuple[_Child, int]:
        """``grpctunnel router`` on a free port, with ``flags``, and its gRPC port."""
        child = self._start(
            f"{name}.log", "-m", "tunnel", "router", "--listen", "127.0.0.1:0",
            "--log-format", "json", *flags,
        )  # fmt: skip
        listening = json.loads(await child.line('"router_listening"'))
        return child, int(listening["grpc"].rpartition(":")[2])

    def agent(self, router_port: int, backend_port: int) -> _Child:
        """``grpctunnel agent`` registering ``KEY`` with the router, for the backend."""
        return self._start(
            "agent.log", "-m", "tunnel", "agent",
            "--router", f"127.0.0.1:{router_port}", "--backend", f"127.0.0.1:{backend_port}",
            "--key", KEY, "--log-format", "json",
        )  # fmt: skip

    def stop(self) -> None:
        for child in reversed(self.started):
            child.stop()


@contextlib.asynccontextmanager
async def _deployment(pb_dir: Path) -> AsyncIterator[tuple[int, int, dict[str, int]]]:
    """Backend, router and agent; yields (backend port, router port, pids)."""
    with tempfile.TemporaryDirectory(prefix="tunnel-router-bench-") as tmp:
        children = Children(Path(tmp))
        try:
            backend, backend_port = await children.backend(pb_dir)
            router, router_port = await children.router("router")
            agent = children.agent(router_port, backend_port)
            await router.line('"tunnel_opened"')
            pids = {
                "backend": backend.process.pid,
                "router": router.process.pid,
                "agent": agent.process.pid,
            }
            yield backend_port, router_port, pids
        finally:
            children.stop()


_TICK = os.sysconf("SC_CLK_TCK")


def cpu_seconds(pid: int) -> float:
    """User and system CPU time a process has used so far (Linux /proc)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / _TICK


async def _rates(
    client: GrpclibClient, budget: Budget, pids: dict[str, int] | None = None
) -> dict[str, Any]:
    """The rates; for unary calls also the CPU milliseconds per call of each of ``pids``.

    CPU time over the measured calls only (not the warm-up); the process
    clock ticks every 10 ms, so a figure is rough below a few hundred calls.
    """
    results: dict[str, Any] = {}
    before: dict[str, float] = {}
    pids = pids or {}

    def measuring() -> None:
        before.update((role, cpu_seconds(pid)) for role, pid in pids.items())

    for name, callers in (("unary_1", 1), ("unary_16", 16), ("bulk", 0)):
        try:
            if callers:
                result = await workloads.unary(client, budget, callers, measuring)
                if pids:
                    used = {role: cpu_seconds(pid) - before[role] for role, pid in pids.items()}
                    result["cpu_ms_per_call"] = {
                        role: 1000 * seconds / result["calls"] for role, seconds in used.items()
                    }
                results[name] = result
            else:
                results[name] = await workloads.bulk(client, budget)
        except Exception as exc:
            results[name] = {"error": f"{type(exc).__name__}: {exc}"}
    return results


async def measure(pb_dir: Path, pb: ModuleType, budget: Budget) -> dict[str, Any]:
    """Direct to the backend, then through router and agent; same processes."""
    async with _deployment(pb_dir) as (backend_port, router_port, pids):
        results: dict[str, Any] = {"pids": pids}
        everyone = {"caller": os.getpid(), **pids}
        for name, port, metadata in (
            ("direct", backend_port, None),
            ("routed", router_port, {"tunnel-key": KEY}),
        ):
            channel = grpclib.client.Channel("127.0.0.1", port)
            try:
                client = GrpclibClient(channel, pb, metadata)
                results[name] = await _rates(client, budget, everyone)
            finally:
                channel.close()
        return results


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router_side")
    parser.add_argument("role", choices=("backend",))
    parser.add_argument("--pb-dir", required=True)
    args = parser.parse_args()
    pb, _ = protos.load(Path(args.pb_dir))
    asyncio.run(serve_until_stopped([BenchService(pb)], "127.0.0.1", 0))


if __name__ == "__main__":
    main()
