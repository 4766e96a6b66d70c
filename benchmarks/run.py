"""``python -m benchmarks``: run every transport in its own process, then report."""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from . import protos, report
from .workloads import FULL, QUICK

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOC = ROOT / "docs" / "benchmarks.md"
CHART = ROOT / "docs" / "benchmarks.png"

GRPCLIB_KINDS = ("direct", "forward", "reverse")
#: Variants measured on the rate workloads only (asyncio, no memory rows).
VARIANT_KINDS = ("forward-wide",)
GRPCIO_KINDS = ("grpcio", "gt-forward", "gt-reverse")
#: ``tunnel.trio`` against asyncio, in a child of its own (benchmarks/trio_side.py).
TRIO_KINDS = ("trio",)
#: ``grpctunnel router`` and ``agent`` as processes, against the same backend
#: reached directly (benchmarks/router_side.py); a table of its own.
#: Router replicas sharing a Redis registry (benchmarks/registry_side.py): the
#: peer hop against a local call, and the registry's load at 10,000 keys.
ROUTER_KINDS = ("router", "replicas")

METHOD = """\
- Every transport runs in fresh child processes (`python -m benchmarks.child`),
  one after the other, so that RSS, the event loop's state and grpcio's
  threads never carry over from one transport to the next, and
  grpctunnel-py's `grpctunnel/v1/tunnel.proto` never meets ours in one
  protobuf descriptor pool. Each memory figure (idle tunnels, idle streams,
  many streams) gets a process of its own, because memory freed by an earlier
  measurement stays with Python's allocator and would hide a later one's
  growth; the rates and the profile share one more. The parent only
  collects JSON.
- In each child, server and client share one process and one event loop and
  talk over loopback TCP (127.0.0.1; listening sockets created with
  IPPROTO_TCP so that TCP_NODELAY is set). On this 2-core machine that is the
  more honest choice: every figure is then the CPU cost of *both* ends on one
  core, which is what a tunnel adds, and it does not depend on how the
  scheduler places two busy processes on two cores shared with whatever else
  runs. A server in a separate process would add parallelism to all
  transports alike and measure the scheduler as much as the code. The price:
  absolute rates are those of one core doing both ends, and memory figures
  count both ends of a tunnel or stream.
- All transports exchange the same google-protobuf (upb) `grpchantesting.Message`,
  generated at bench time with `grpc_tools.protoc` from
  `proto/grpchantesting/test.proto` into a temporary directory, and the same
  minimal service (Unary echoes; ServerStream sends `count` copies of the
  payload; BidiStream echoes each message). So message encoding costs the
  same everywhere and the comparison is about the transports. Our tunnels
  serve it with a grpclib handler; grpcio with a generated servicer;
  grpctunnel-py with `register_method` handlers that decode and encode the
  messages as a servicer would.
- The tunnels are carried by a grpclib (ours) or grpcio (grpctunnel-py)
  channel to the same kind of server; flow control is on (protocol
  revision one) for every tunnel.
- Rates are wall-clock over a fixed time after a warm-up ({warmup} s warm-up,
  {duration} s measured per figure); latencies are per call over the same
  calls. RSS is read from /proc/self after a `gc.collect()`; peak RSS from
  VmHWM, reset before the measurement through /proc/self/clear_refs.
- uvloop columns repeat the rate and latency workloads on uvloop for the
  grpclib transports (grpcio runs its own I/O; its asyncio integration is
  not what is compared here).
"""

MEANING = """\
- **unary, 1 caller**: one task calling Unary (16-byte payload) back to back;
  calls per second, and the median and 99th percentile of each call's time.
- **unary, 16 callers**: 16 tasks doing the same at once on one channel
  (tunnel); total calls per second, and per-call latency percentiles (a call
  waits behind the other 15, so latency is about 16 / rate).
- **server streaming**: ServerStream calls of {stream_count} messages of
  100 bytes each, back to back; messages received per second.
- **bulk**: one BidiStream call at a time carrying {bulk} messages of 1 MiB,
  sent by one task and read back (echoed) by another, pipelined; MiB per
  second, each message counted once though it crosses the loopback twice.
- **SendRPCs mix**: the load the reference's interop programs put on a
  tunnel (`tunnel.testing`'s `send_rpcs`, jhump/grpctunnel's
  `internal.SendRPCs`) for {mix} s: four loops at once on one channel
  (tunnel), repeating unary calls (400 B), client-streaming calls (10
  requests of 40,000 B), server-streaming calls (10 replies of 4,000 B) and
  bidi calls (10 requests of 4,000 B, each echoed), against
  `tunnel.testing`'s `TestService` (betterproto messages, as in the
  reference); completed calls per second of each kind.
- **{many} concurrent streams**: {many} BidiStream calls started at once on
  one channel (tunnel); each sends one message, reads the echo, half-closes
  and waits for the end of the call. *s* is the time until all have ended;
  *most in flight* is the most handlers the server ran at once (direct
  grpclib is capped at 100 by h2's default MAX_CONCURRENT_STREAMS, the rest
  queue; our tunnels by `max_concurrent_streams`, 100 by default, and our
  clients queue the rest too; grpctunnel-py has no cap, so this row is not
  among those it is compared on; grpcio's client barely overlaps these
  short calls); *peak RSS growth* is the process's peak RSS during the run
  over its RSS before.
- **idle tunnel**: RSS growth per open tunnel with no call in it, {tunnels}
  tunnels over {connections} connections ({per} per connection), measured
  after the connections were up, so it is the tunnel with its carrying
  stream, both ends. For the direct transports the "tunnel" is one open,
  idle BidiStream call (with one message exchanged): the carrier a tunnel
  rides on, so the ratio is what a tunnel costs over a bare stream.
- **idle stream**: RSS growth per open BidiStream call (one message
  exchanged, then idle), {streams} of them on one channel (tunnel), both ends.
"""


def _machine(versions: dict[str, Any]) -> dict[str, Any]:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "memory_gib": memory,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "versions": versions,
    }


def _revision() -> str:
    """The commit measured, and whether tunnel/ had uncommitted changes."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "tunnel"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return head + (" with uncommitted changes in tunnel/" if dirty else "")


def _plan(args: argparse.Namespace) -> tuple[list[tuple[str, str]], list[str]]:
    every = [*GRPCLIB_KINDS, *VARIANT_KINDS, *GRPCIO_KINDS, *TRIO_KINDS, *ROUTER_KINDS]
    wanted = args.only.split(",") if args.only else every
    unknown = set(wanted) - set(every)
    if unknown:
        raise SystemExit(f"unknown transports: {', '.join(sorted(unknown))}")
    plan: list[tuple[str, str]] = []
    skipped: list[str] = []
    have_grpc = importlib.util.find_spec("grpc") is not None
    have_gt = importlib.util.find_spec("grpctunnel") is not None
    for kind in wanted:
        if kind in TRIO_KINDS:
            continue  # run on its own, after the others (see main)
        if kind in GRPCIO_KINDS and not have_grpc:
            skipped.append(f"{report.LABELS[kind]}: grpcio is not installed")
        elif kind.startswith("gt-") and not have_gt:
            skipped.append(f"{report.LABELS[kind]}: grpctunnel-py is not installed")
        else:
            plan.append((kind, "asyncio"))
    if not args.no_uvloop:
        if importlib.util.find_spec("uvloop") is None:
            skipped.append("uvloop columns: uvloop is not installed (the `bench` extra has it)")
        else:
            plan += [(kind, "uvloop") for kind in GRPCLIB_KINDS if kind in wanted]
    return plan, skipped


#: Measurements per child process.  Each memory figure gets a fresh process
#: (see benchmarks/child.py); the rates share one.
STEPS_ASYNCIO = (
    "idle_tunnels",
    "idle_streams",
    "many_streams",
    "unary_1,unary_16,server_stream,bulk",
)
STEPS_UVLOOP = ("unary_1,unary_16,server_stream,bulk",)


def _run_transport(
    kind: str, loop: str, budget: str, pb_dir: Path, tmp: Path, quick: bool
) -> dict[str, Any]:
    groups = list(
        STEPS_ASYNCIO if loop == "asyncio" and kind not in VARIANT_KINDS else STEPS_UVLOOP
    )
    if kind in ROUTER_KINDS:
        groups = ["router"]
    if kind in GRPCLIB_KINDS or kind in VARIANT_KINDS:
        groups[-1] += ",mix"
        if loop == "asyncio":
            groups[-1] += ",profile_bulk"
    if loop == "asyncio" and kind in GRPCLIB_KINDS:
        groups[-1] += ",profile"
    print(f"{kind} ({loop}):", file=sys.stderr, flush=True)
    merged: dict[str, Any] = {"transport": kind, "loop": loop, "results": {}, "elapsed_s": 0.0}
    errors = []
    for i, steps in enumerate(groups):
        out = tmp / f"{kind}-{loop}-{i}.json"
        part = _run_child(kind, loop, budget, pb_dir, out, steps, 60 if quick else 180)
        merged["results"].update(part.pop("results", {}))
        merged["elapsed_s"] += part.pop("elapsed_s")
        if "error" in part:
            errors.append(f"{steps}: {part.pop('error')}")
        merged.update({k: v for k, v in part.items() if k not in merged})
    if errors:
        merged["error"] = "; ".join(errors)
    return merged


def _run_child(
    kind: str, loop: str, budget: str, pb_dir: Path, out: Path, steps: str, timeout: float
) -> dict[str, Any]:
    command = [
        sys.executable,
        "-m",
        "benchmarks.child",
        f"--transport={kind}",
        f"--loop={loop}",
        f"--budget={budget}",
        f"--pb-dir={pb_dir}",
        f"--out={out}",
        f"--steps={steps}",
    ]
    start = time.perf_counter()
    try:
        done = subprocess.run(command, cwd=ROOT, timeout=timeout, stdout=sys.stderr)
        failure = None if done.returncode == 0 else f"exit status {done.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout:.0f} s"
    if out.exists():
        result: dict[str, Any] = json.loads(out.read_text())
    else:
        result = {"transport": kind, "loop": loop, "results": {}}
    if failure:
        result["error"] = failure
    result["elapsed_s"] = time.perf_counter() - start
    return result


def _run_trio(budget: str, pb_dir: Path, tmp: Path, quick: bool) -> dict[str, Any]:
    """``benchmarks.trio_side`` in a child process: trio against asyncio."""
    print("trio (tunnel.trio against asyncio):", file=sys.stderr, flush=True)
    out = tmp / "trio.json"
    command = [
        sys.executable,
        "-m",
        "benchmarks.trio_side",
        f"--budget={budget}",
        f"--pb-dir={pb_dir}",
        f"--out={out}",
    ]
    timeout = 60 if quick else 180
    try:
        done = subprocess.run(command, cwd=ROOT, timeout=timeout, stdout=sys.stderr)
        failure = None if done.returncode == 0 else f"exit status {done.returncode}"
    except subprocess.TimeoutExpired:
        failure = f"timed out after {timeout} s"
    result: dict[str, Any] = json.loads(out.read_text()) if out.exists() else {}
    if failure:
        result["error"] = failure
    return result


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="a ~30 s smoke run")
    parser.add_argument(
        "--only",
        help="comma-separated transports: "
        + ",".join(GRPCLIB_KINDS + VARIANT_KINDS + GRPCIO_KINDS + TRIO_KINDS + ROUTER_KINDS),
    )
    parser.add_argument("--no-uvloop", action="store_true", help="skip the uvloop columns")
    parser.add_argument("--json-out", type=Path, help="where to write the JSON results")
    parser.add_argument(
        "--no-docs",
        action="store_true",
        help="do not rewrite docs/benchmarks.md and .png (never rewritten by --quick or --only)",
    )
    parser.add_argument(
        "--docs-from", type=Path, help="only rewrite the docs from a results JSON of a full run"
    )
    args = parser.parse_args()
    if args.docs_from:
        write_docs(json.loads(args.docs_from.read_text()))
        return
    budget = QUICK if args.quick else FULL
    budget_name = "quick" if args.quick else "full"
    plan, skipped = _plan(args)
    command = "python -m benchmarks " + " ".join(sys.argv[1:])

    revision = _revision()
    load_before = os.getloadavg()
    started = time.perf_counter()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="tunnel-bench-") as tmp:
        pb_dir = Path(tmp) / "pb"
        protos.generate(pb_dir)
        for kind, loop in plan:
            runs.append(_run_transport(kind, loop, budget_name, pb_dir, Path(tmp), args.quick))
        wanted = args.only.split(",") if args.only else TRIO_KINDS
        trio = _run_trio(budget_name, pb_dir, Path(tmp), args.quick) if "trio" in wanted else None
    load_after = os.getloadavg()

    router_run = next((r for r in runs if r["transport"] == "router"), None)
    replicas_run = next((r for r in runs if r["transport"] == "replicas"), None)
    runs = [r for r in runs if r["transport"] not in ROUTER_KINDS]
    versions = next((r["versions"] for r in runs if "versions" in r), {})
    data: dict[str, Any] = {
        "command": command.strip(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "elapsed_s": time.perf_counter() - started,
        "revision": revision,
        "budget": asdict(budget),
        "load_before": load_before,
        "load_after": load_after,
        "machine": _machine(versions),
        "skipped": skipped,
        "runs": runs,
        "trio": trio,
        "router": router_run,
        "replicas": replicas_run,
    }
    json_out = args.json_out or RESULTS / ("quick.json" if args.quick else "latest.json")
    json_out.parent.mkdir(parents=True, exist_ok=True)
    json_out.write_text(json.dumps(data, indent=1))

    if runs:
        print(report.table(runs, budget.many_streams, markdown=False))
    if trio is not None:
        print("\n".join(report.trio_lines(trio)))
    if router_run is not None:
        print()
        print(report.router_table(router_run, markdown=False))
    if replicas_run is not None:
        print()
        print(report.replicas_table(replicas_run, markdown=False))
    for run in runs:
        errors = {k: v["error"] for k, v in run.get("results", {}).items() if "error" in v}
        if run.get("error") or errors:
            print(f"{report.column_name(run)}: {run.get('error') or ''} {errors}")
    for line in skipped:
        print(f"skipped: {line}")
    print(f"load average {load_before[0]:.2f} -> {load_after[0]:.2f}; results in {json_out}")

    if not (args.quick or args.only or args.no_docs):
        write_docs(data)
        print(f"wrote {DOC.relative_to(ROOT)} and {CHART.relative_to(ROOT)}")
    process_runs = [run for run in (router_run, replicas_run) if run is not None]
    failed = any(run.get("error") for run in [*runs, *process_runs]) or bool(
        trio and trio.get("error")
    )
    sys.exit(1 if failed else 0)


def write_docs(data: dict[str, Any]) -> None:
    b = data["budget"]
    per = 50
    meaning = MEANING.format(
        stream_count=b["stream_count"],
        bulk=b["bulk_messages"],
        mix=f"{b['mix_seconds']:g}",
        many=f"{b['many_streams']:,}",
        tunnels=f"{b['idle_tunnels']:,}",
        connections=-(-b["idle_tunnels"] // per),
        per=per,
        streams=b["idle_streams"],
    )
    method = METHOD.format(warmup=b["warmup"], duration=b["duration"])
    DOC.parent.mkdir(parents=True, exist_ok=True)
    page = report.markdown(
        data,
        DOC,
        meaning,
        method,
        lambda: report.table(data["runs"], b["many_streams"], markdown=True),
    )
    DOC.write_text(page)
    report.chart(data, CHART)


if __name__ == "__main__":
    main()
