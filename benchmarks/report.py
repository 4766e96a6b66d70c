"""The table, docs/benchmarks.md and docs/benchmarks.png, from the collected runs."""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASELINE = "direct"
ANALYSIS_START = "<!-- analysis: kept when the page is regenerated -->"
ANALYSIS_END = "<!-- /analysis -->"

LABELS = {
    "direct": "direct grpclib",
    "forward": "forward tunnel",
    "reverse": "reverse tunnel",
    "forward-wide": "forward, 1 MiB windows",
    "grpcio": "direct grpcio.aio",
    "gt-forward": "grpctunnel-py fwd",
    "gt-reverse": "grpctunnel-py rev",
}


@dataclass(frozen=True)
class Row:
    key: str  # "measurement.field"
    label: str
    higher_is_better: bool
    digits: int = 0

    def value(self, run: dict[str, Any]) -> float | str | None:
        step, field = self.key.split(".")
        result = run.get("results", {}).get(step)
        if result is None:
            return None
        if "error" in result:
            return "error"
        value = result.get(field)
        return float(value) if isinstance(value, int | float) else None


def rows(many: int) -> list[Row]:
    return [
        Row("unary_1.calls_per_s", "unary, 1 caller: calls/s", True),
        Row("unary_1.p50_us", "unary, 1 caller: p50 µs", False),
        Row("unary_1.p99_us", "unary, 1 caller: p99 µs", False),
        Row("unary_16.calls_per_s", "unary, 16 callers: calls/s", True),
        Row("unary_16.p50_us", "unary, 16 callers: p50 µs", False),
        Row("unary_16.p99_us", "unary, 16 callers: p99 µs", False),
        Row("server_stream.msgs_per_s", "server streaming: msgs/s (100 B)", True),
        Row("bulk.mib_per_s", "bulk, 1 MiB msgs echoed: MiB/s", True, 1),
        Row("mix.unary_per_s", "SendRPCs mix: unary calls/s", True),
        Row("mix.client_stream_per_s", "SendRPCs mix: client-streaming calls/s", True),
        Row("mix.server_stream_per_s", "SendRPCs mix: server-streaming calls/s", True),
        Row("mix.bidi_per_s", "SendRPCs mix: bidi calls/s", True),
        Row("many_streams.seconds", f"{many:,} concurrent streams: s", False, 2),
        Row("many_streams.peak_in_flight", f"{many:,} streams: most in flight", True),
        Row("many_streams.peak_rss_growth_mib", f"{many:,} streams: peak RSS growth MiB", False, 1),
        Row("idle_tunnels.kib_per_tunnel", "idle tunnel: KiB RSS (both ends)", False, 1),
        Row("idle_streams.kib_per_stream", "idle stream: KiB RSS (both ends)", False, 1),
    ]


def column_name(run: dict[str, Any]) -> str:
    name = LABELS.get(run["transport"], run["transport"])
    return name + (" +uvloop" if run["loop"] == "uvloop" else "")


def _fmt(value: float, digits: int) -> str:
    if math.isnan(value):
        return "n/a"
    return f"{value:,.{digits}f}"


def cell(row: Row, run: dict[str, Any], base: dict[str, Any] | None) -> str:
    value = row.value(run)
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    text = _fmt(value, row.digits)
    if base is None or run is base:
        return text
    base_value = row.value(base)
    if isinstance(base_value, float) and base_value and not math.isnan(base_value):
        text += f" ({value / base_value:.2f}x)"
    return text


def _baseline(runs: list[dict[str, Any]]) -> dict[str, Any] | None:
    for run in runs:
        if run["transport"] == BASELINE and run["loop"] == "asyncio":
            return run
    return None


def table(runs: list[dict[str, Any]], many: int, markdown: bool) -> str:
    base = _baseline(runs)
    header = ["", *(column_name(r) for r in runs)]
    body = [[row.label, *(cell(row, r, base) for r in runs)] for row in rows(many)]
    return _render(header, body, markdown)


def _render(header: list[str], body: list[list[str]], markdown: bool) -> str:
    """A table as markdown, or as aligned plain text for the terminal."""
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        lines += ["| " + " | ".join(line) + " |" for line in body]
        return "\n".join(lines)
    widths = [max(len(line[i]) for line in [header, *body]) for i in range(len(header))]
    return "\n".join(
        "  ".join(text.ljust(width) for text, width in zip(line, widths, strict=True))
        for line in [header, *body]
    )


# -- targets ---------------------------------------------------------------------------


def _get(runs: list[dict[str, Any]], transport: str, key: str) -> float | None:
    for run in runs:
        if run["transport"] == transport and run["loop"] == "asyncio":
            row = Row(key, key, True)
            value = row.value(run)
            return value if isinstance(value, float) else None
    return None


def targets(runs: list[dict[str, Any]], many: int) -> list[str]:
    """One line per target of the benchmark issue, with the measured figure."""
    lines: list[str] = []

    def ratio_line(label: str, key: str, least: float, transport: str = "forward") -> None:
        ours, base = _get(runs, transport, key), _get(runs, "direct", key)
        if ours is None or base is None:
            lines.append(f"- {label}: not measured")
            return
        ratio = ours / base
        verdict = "met" if ratio >= least else "**missed**"
        lines.append(f"- {label} ≥ {least:.1f}x direct grpclib: {ratio:.2f}x, {verdict}")

    ratio_line("forward unary calls/s (1 caller)", "unary_1.calls_per_s", 1.0)
    ratio_line("forward unary calls/s (16 callers)", "unary_16.calls_per_s", 1.0)
    ratio_line("forward streaming msgs/s", "server_stream.msgs_per_s", 0.9)
    ratio_line("forward bulk MiB/s", "bulk.mib_per_s", 0.8)
    ratio_line("forward bulk MiB/s, 1 MiB windows", "bulk.mib_per_s", 1.0, "forward-wide")
    for kind in ("unary", "client_stream", "server_stream", "bidi"):
        label = f"forward SendRPCs mix, {kind.replace('_', '-')} calls/s"
        ratio_line(label, f"mix.{kind}_per_s", 1.0)
    for ours, theirs in (("forward", "gt-forward"), ("reverse", "gt-reverse")):
        if not any(r["transport"] == theirs for r in runs):
            lines.append(f"- {ours} ahead of grpctunnel-py: not measured (not installed)")
            continue
        behind = []
        for row in rows(many):
            if row.key == "many_streams.peak_in_flight":
                # Not a race: ours are capped by max_concurrent_streams (100).
                continue
            a, b = _get(runs, ours, row.key), _get(runs, theirs, row.key)
            if a is None or b is None:
                continue
            if (a < b) if row.higher_is_better else (a > b):
                behind.append(row.label)
        verdict = "met" if not behind else "**missed** on: " + "; ".join(behind)
        lines.append(f"- {ours} ahead of grpctunnel-py on every row: {verdict}")
    for kind in ("forward", "reverse"):
        idle = _get(runs, kind, "idle_tunnels.kib_per_tunnel")
        if idle is not None:
            verdict = "met" if idle < 50 else "**missed**"
            lines.append(f"- an idle {kind} tunnel < 50 KiB (both ends): {idle:.1f} KiB, {verdict}")
    return lines


# -- trio ------------------------------------------------------------------------------

TRIO_TARGET = 0.8


def trio_lines(trio: dict[str, Any] | None) -> list[str]:
    """The trio rows: unary calls/s from trio against asyncio, same process and run."""
    if not trio:
        return ["Not run."]
    if "error" in trio or "results" not in trio:
        return [f"Failed: {trio.get('error', 'no results')}"]
    results = trio["results"]
    rates = results["calls_per_s"]
    base = rates["asyncio"]
    return [
        "| unary over a forward tunnel, 1 caller | calls/s | vs asyncio |",
        "|---|---|---|",
        f"| asyncio caller, asyncio handler (`tunnel`) | {base:,.0f} | 1.00x |",
        f"| trio caller, asyncio handler (`tunnel.trio`) | {rates['trio']:,.0f} "
        f"| {results['ratio_trio']:.2f}x |",
        f"| trio caller, trio handler (`tunnel.trio`) | {rates['trio_handler']:,.0f} "
        f"| {results['ratio_trio_handler']:.2f}x |",
    ]


def trio_target(trio: dict[str, Any] | None) -> str:
    label = f"trio forward unary calls/s ≥ {TRIO_TARGET:.1f}x the same from asyncio"
    if not trio or "results" not in trio:
        return f"- {label}: not measured"
    ratio = trio["results"]["ratio_trio"]
    verdict = "met" if ratio >= TRIO_TARGET else "**missed**"
    return f"- {label}: {ratio:.2f}x, {verdict}"


# -- profile ---------------------------------------------------------------------------


def profile_section(runs: list[dict[str, Any]]) -> str:
    profiled = [
        r
        for r in runs
        if r["loop"] == "asyncio"
        and "buckets_us_per_call" in r.get("results", {}).get("profile", {})
    ]
    if not profiled:
        return "No profile was taken."
    buckets = list(profiled[0]["results"]["profile"]["buckets_us_per_call"])
    header = ["bucket (own time)", *(column_name(r) + " µs (share)" for r in profiled)]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for bucket in buckets:
        cells = [bucket]
        for r in profiled:
            p = r["results"]["profile"]
            us = p["buckets_us_per_call"][bucket]
            cells.append(f"{us:.1f} ({us / p['profiled_us_per_call']:.0%})")
        lines.append("| " + " | ".join(cells) + " |")
    for label, field in (
        ("total, profiled", "profiled_us_per_call"),
        ("total, not profiled", "unprofiled_us_per_call"),
    ):
        cells = [f"**{label}**"]
        cells += [f"**{r['results']['profile'][field]:.1f}**" for r in profiled]
        lines.append("| " + " | ".join(cells) + " |")
    out = ["\n".join(lines)]

    forward = next((r for r in profiled if r["transport"] == "forward"), None)
    if forward is not None:
        p = forward["results"]["profile"]
        codec = p.get("frame_codec", {})
        if codec:
            out.append(
                f"The {codec['frames']} grpctunnel.v1 frames of one unary call take "
                f"{codec['us_per_call']:.1f} µs to build, encode and decode with upb, "
                "timed without the profiler."
            )
        hot = ["| function | calls per call | own µs | cumulative µs |", "|---|---|---|---|"]
        for h in p["tunnel_hot_spots"]:
            hot.append(
                f"| `{h['function']}` | {h['calls_per_call']:.1f} | {h['own_us']:.1f} "
                f"| {h['cumulative_us']:.1f} |"
            )
        out.append(
            "Hot spots in `tunnel/` (forward tunnel, per unary call, profiled):\n\n"
            + "\n".join(hot)
        )
    return "\n\n".join(out)


def bulk_profile_section(runs: list[dict[str, Any]]) -> str:
    """µs per 16 KiB chunk of one 1 MiB message each way, by bucket; the copies."""
    profiled = [
        r
        for r in runs
        if r["loop"] == "asyncio"
        and "buckets_us_per_chunk" in r.get("results", {}).get("profile_bulk", {})
    ]
    if not profiled:
        return "No profile was taken."
    first = profiled[0]["results"]["profile_bulk"]
    header = ["bucket (own time)", *(column_name(r) + " µs (share)" for r in profiled)]
    body: list[list[str]] = []
    for bucket in first["buckets_us_per_chunk"]:
        cells = [bucket]
        for r in profiled:
            p = r["results"]["profile_bulk"]
            us = p["buckets_us_per_chunk"][bucket]
            cells.append(f"{us:.1f} ({us / p['profiled_us_per_chunk']:.0%})")
        body.append(cells)
    cells = ["of grpclib + h2: h2's repr of each received frame"]
    for r in profiled:
        p = r["results"]["profile_bulk"]
        us = p["h2_repr_us_per_chunk"]
        cells.append(f"{us:.1f} ({us / p['profiled_us_per_chunk']:.0%})")
    body.append(cells)
    for label, field in (
        ("total, profiled", "profiled_us_per_chunk"),
        ("total, not profiled", "unprofiled_us_per_chunk"),
    ):
        body.append(
            [f"**{label}**", *(f"**{r['results']['profile_bulk'][field]:.1f}**" for r in profiled)]
        )
    out = [_render(header, body, markdown=True)]
    for r in profiled:
        if r["transport"] == BASELINE:
            continue
        copies = ["| layer | copy | made by | calls per chunk |", "|---|---|---|---|"]
        for c in r["results"]["profile_bulk"]["copies"]:
            copies.append(
                f"| {c['layer']} | {c['copy']} | `{c['by']}` | {c['calls_per_chunk']:.2f} |"
            )
        out.append(
            f"Built-in calls that copy bytes, per chunk ({column_name(r)}, profiled; "
            "copies by slicing, `bytes(view)` and `bytearray +=` are not seen):\n\n"
            + "\n".join(copies)
        )
    return "\n\n".join(out)


# -- the page and the chart ---------------------------------------------------------------


def _kept_analysis(path: Path) -> str:
    if path.exists():
        match = re.search(
            re.escape(ANALYSIS_START) + r"\n(.*?)" + re.escape(ANALYSIS_END),
            path.read_text(),
            re.S,
        )
        if match:
            return match.group(1)
    return "(No analysis written yet.)\n"


def markdown(
    data: dict[str, Any], path: Path, meaning: str, method: str, render: Callable[[], str]
) -> str:
    runs = data["runs"]
    many = data["budget"]["many_streams"]
    machine = data["machine"]
    skipped = "\n".join(f"- {s}" for s in data["skipped"]) or "- nothing"
    versions = ", ".join(f"{k} {v}" for k, v in machine["versions"].items() if v)
    return f"""# Benchmarks

Generated by `{data["command"]}` on {data["date"]} ({data["elapsed_s"]:.0f} s),
measuring commit {data.get("revision", "unknown")}; re-run it to refresh everything
but the analysis section.

Machine: {machine["cpu"]}, {machine["cores"]} cores, {machine["memory_gib"]:.0f} GiB,
Linux {machine["kernel"]}, CPython {machine["python"]}; {versions}.
Load average (1 min) {data["load_before"][0]:.2f} before the run and
{data["load_after"][0]:.2f} after it.

![chart](benchmarks.png)

## Results

Each cell is the figure and, in brackets, its ratio to direct grpclib on the
standard asyncio loop measured in the same run. For rates higher is better;
for latencies, times and memory lower is better.

{render()}

Not run:

{skipped}

## Through `grpctunnel router` and `agent`

{router_section(data.get("router"))}

## Router replicas: the peer hop and the registry

{replicas_section(data.get("replicas"))}

## Targets

{chr(10).join(targets(runs, many))}
{trio_target(data.get("trio"))}

## From trio

`tunnel.trio` (docs/trio.md) in one process, in rounds that alternate with
plain asyncio ones; medians of the rounds. Server and client share one loop,
as above: for trio, the trio-asyncio loop inside `trio.run`.

{chr(10).join(trio_lines(data.get("trio")))}

## How it is measured

{method}

## What each row means

{meaning}

## Where the time of one unary call goes

{profile_section(runs)}

## Where the time of one 1 MiB message goes

cProfile of 1 MiB messages echoed over one BidiStream call, as in the bulk
row, attributed by module as above; in µs per 16 KiB chunk crossing once
(a tunnel's chunk, or an HTTP/2 DATA frame of direct grpclib), so each
message counts 128 chunks (64 each way).

{bulk_profile_section(runs)}

## Analysis

{ANALYSIS_START}
{_kept_analysis(path)}{ANALYSIS_END}
"""


def chart(data: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = data["runs"]
    base = _baseline(runs)
    many = data["budget"]["many_streams"]
    all_rows = rows(many)
    speed = [r for r in all_rows if r.higher_is_better and "in flight" not in r.label]
    memory = [r for r in all_rows if r.key.startswith("idle_")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(14, 5.5), width_ratios=(2.2, 1))
    width = 0.8 / max(1, len(runs))
    for i, run in enumerate(runs):
        ratios = []
        for row in speed:
            value, base_value = row.value(run), row.value(base) if base else None
            ok = isinstance(value, float) and isinstance(base_value, float) and base_value
            ratios.append(value / base_value if ok else 0.0)  # type: ignore[operator]
        xs = [x + i * width for x in range(len(speed))]
        left.bar(xs, ratios, width, label=column_name(run))
        kib = [v if isinstance(v := row.value(run), float) else 0.0 for row in memory]
        right.bar([x + i * width for x in range(len(memory))], kib, width)
    left.axhline(1.0, color="black", linewidth=0.8)
    left.set_xticks([x + 0.4 - width / 2 for x in range(len(speed))])
    left.set_xticklabels([r.label.replace(": ", "\n") for r in speed], fontsize=8)
    left.set_ylabel("ratio to direct grpclib (higher is better)")
    left.set_yscale("log")
    left.legend(fontsize=7, ncol=2)
    right.set_xticks([x + 0.4 - width / 2 for x in range(len(memory))])
    right.set_xticklabels([r.label.split(":")[0] for r in memory], fontsize=8)
    right.set_ylabel("KiB RSS, both ends (lower is better)")
    fig.suptitle(f"tunnel benchmarks, {data['date']} ({data['machine']['cores']} cores)")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


# -- the router rows ---------------------------------------------------------------------

#: The rate rows of the main table that the router child measures.
ROUTER_ROWS = [row for row in rows(0) if row.key.split(".")[0] in ("unary_1", "unary_16", "bulk")]


def router_table(run: dict[str, Any], markdown: bool) -> str:
    """Caller -> backend directly vs caller -> router -> agent -> backend (processes)."""
    results = run.get("results", {})
    direct = {"results": results.get("direct", {})}
    routed = {"results": results.get("routed", {})}
    header = ["", "caller -> backend", "caller -> router -> agent -> backend"]
    body = [[row.label, cell(row, direct, None), cell(row, routed, direct)] for row in ROUTER_ROWS]
    for step, label in (("unary_1", "unary, 1 caller"), ("unary_16", "unary, 16 callers")):
        body.append(
            [
                f"{label}: CPU ms per call",
                _cpu_cell(direct, step, ("caller", "backend")),
                _cpu_cell(routed, step, ("caller", "router", "agent", "backend")),
            ]
        )
    if run.get("error"):
        body.append(["error", run["error"], ""])
    return _render(header, body, markdown)


def _cpu_cell(run: dict[str, Any], step: str, roles: tuple[str, ...]) -> str:
    """Each process's CPU milliseconds per call: where the time goes."""
    cpu = run["results"].get(step, {}).get("cpu_ms_per_call")
    if not cpu:
        return "-"
    return ", ".join(f"{role} {cpu[role]:.2f}" for role in roles)


def router_section(run: dict[str, Any] | None) -> str:
    if run is None:
        return "Not measured in this run."
    return f"""Four processes on the same 2 cores: the backend (the benchmark service
on a plain grpclib server), `grpctunnel agent` in front of it, `grpctunnel
router`, and the caller (the benchmark's child process). The caller first
goes to the backend directly, then through the router by key, against the
same backend process; in brackets the ratio to the direct figure. The
target is at least 0.5x for unary calls/s. The CPU rows give each process's
CPU time (user and system) per call over the measured calls: where the time
goes.

{router_table(run, markdown=True)}"""


# -- the replica rows ---------------------------------------------------------------------


def replicas_table(run: dict[str, Any], markdown: bool) -> str:
    """A call through the router holding its key vs one crossing the peer hop; the registry."""
    results = run.get("results", {})
    hop = results.get("hop", {})
    local = {"results": hop.get("local", {})}
    peer = {"results": hop.get("peer", {})}
    header = ["", "caller -> r2 (holds the key)", "caller -> r1 -> r2 (peer hop)"]
    body = [[row.label, cell(row, local, None), cell(row, peer, local)] for row in ROUTER_ROWS]
    if "error" in hop:
        body.append(["peer hop: error", hop["error"], ""])
    registry = results.get("registry", {})
    if "error" in registry:
        body.append(["registry: error", registry["error"], ""])
    elif registry:
        keys, routers = registry["keys"], registry["routers"]
        body += [
            [
                f"registry, {keys:,} keys over {routers} routers: a refresh of all of them",
                f"{registry['refresh_round_s'] * 1000:.0f} ms",
                f"{registry['refresh_ops_per_s']:,.0f} Redis ops/s",
            ],
            [
                "registry: steady refresh load at the default TTL (30 s)",
                f"{registry['steady_ops_per_s']:,.0f} Redis ops/s",
                "",
            ],
            [
                f"registry: lookup of a key ({registry['lookups']:,} in a row)",
                f"p50 {registry['lookup_p50_us']:.0f} µs",
                f"p99 {registry['lookup_p99_us']:.0f} µs",
            ],
        ]
    if run.get("error"):
        body.append(["error", run["error"], ""])
    return _render(header, body, markdown)


def replicas_section(run: dict[str, Any] | None) -> str:
    if run is None:
        return "Not measured in this run."
    return f"""Processes on the same 2 cores: redis-server, the backend, two `grpctunnel
router --registry` replicas (r1, r2) and an agent registered with r2. The
caller goes through r2, which holds the key, then through r1, which looks
the key up in the registry and forwards the call to r2 over the peer
listener; in brackets the ratio to the call through r2. The registry rows
run three routers' stores in the benchmark process against the same
redis-server, with 10,000 keys spread over them: a refresh writes every
key once (one Lua script per key, pipelined), and the lookups are one at
a time, as a call for a remote key makes them.

{replicas_table(run, markdown=True)}"""
