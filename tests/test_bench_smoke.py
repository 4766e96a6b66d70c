"""The benchmark package still runs: a smoke run of direct grpclib and a forward tunnel.

Not a performance test: it only checks that ``python -m benchmarks`` runs end
to end and reports a figure for every measurement, so the benchmark code does
not rot between the runs that refresh docs/benchmarks.md.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parent.parent


def quick_bench(tmp_path: Path, only: str, timeout: float) -> tuple[dict[str, Any], str]:
    """``python -m benchmarks --quick --only=ONLY --no-uvloop``: its JSON and its output."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable, "-m", "benchmarks", "--quick", f"--only={only}", "--no-uvloop",
            f"--json-out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr
    data: dict[str, Any] = json.loads(out.read_text())
    return data, done.stdout


@pytest.mark.timeout(60)
def test_quick_bench_runs(tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only=direct,forward",
            "--no-uvloop",
            f"--json-out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    runs = {run["transport"]: run for run in data["runs"]}
    assert set(runs) == {"direct", "forward"}
    for run in runs.values():
        results = run["results"]
        errors = {name: r["error"] for name, r in results.items() if "error" in r}
        assert not errors, errors
        assert results["unary_1"]["calls_per_s"] > 0
        assert results["bulk"]["mib_per_s"] > 0
        assert results["many_streams"]["completed"] == data["budget"]["many_streams"]
    assert runs["forward"]["results"]["profile"]["buckets_us_per_call"]["tunnel/_core"] > 0
    assert "forward tunnel" in done.stdout


@pytest.mark.timeout(60)
def test_quick_trio_bench_runs(tmp_path: Path) -> None:
    """The trio row: unary calls/s from trio and from asyncio, in one run."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [sys.executable, "-m", "benchmarks", "--quick", "--only=trio", f"--json-out={out}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    trio = json.loads(out.read_text())["trio"]
    rates = trio["results"]["calls_per_s"]
    assert rates["asyncio"] > 0 and rates["trio"] > 0 and rates["trio_handler"] > 0
    assert trio["results"]["ratio_trio"] == rates["trio"] / rates["asyncio"]
    assert "trio caller, asyncio handler" in done.stdout


@pytest.mark.timeout(90)
def test_quick_router_bench_runs(tmp_path: Path) -> None:
    """The router rows: processes started, both routes measured, processes stopped."""
    out = tmp_path / "bench.json"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks",
            "--quick",
            "--only=router",
            "--no-uvloop",
            f"--json-out={out}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=80,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    data = json.loads(out.read_text())
    assert data["runs"] == []
    results = data["router"]["results"]
    for route in ("direct", "routed"):
        errors = {name: r["error"] for name, r in results[route].items() if "error" in r}
        assert not errors, errors
        assert results[route]["unary_1"]["calls_per_s"] > 0
        assert results[route]["bulk"]["mib_per_s"] > 0
        cpu = results[route]["unary_16"]["cpu_ms_per_call"]
        assert set(cpu) == {"caller", "backend", "router", "agent"}
        assert all(ms >= 0 for ms in cpu.values())
    assert "caller -> router -> agent -> backend" in done.stdout
    assert "unary, 16 callers: CPU ms per call" in done.stdout


@pytest.mark.timeout(120)
def test_quick_replicas_bench_runs(tmp_path: Path) -> None:
    """The replica rows: the peer hop against a local call, and the registry's load."""
    data, output = quick_bench(tmp_path, "replicas", 110)
    results = data["replicas"]["results"]
    for route in ("local", "peer"):
        assert results["hop"][route]["unary_1"]["calls_per_s"] > 0
    registry = results["registry"]
    assert registry["refresh_ops_per_s"] > 0 and registry["lookup_p99_us"] > 0
    assert "caller -> r1 -> r2 (peer hop)" in output


@pytest.mark.timeout(60)
def test_router_costs_runs() -> None:
    """``benchmarks.router_costs``: every chain measured, the profile's counts printed."""
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "benchmarks.router_costs",
            "--rounds=1",
            "--seconds=0.2",
            "--callers=1",
            "--profile=/dev/null",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=50,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    for variant in ("direct", "reverse tunnel", "noop relays", "proxy relays", "router + agent"):
        (row,) = [line for line in lines if line.startswith(variant)]
        assert float(row.split()[-2]) > 0  # µs per call
    assert any(line.split()[:2] == ["socket", "sends"] for line in lines)
