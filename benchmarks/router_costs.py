"""Where a routed call's time goes: ``python -m benchmarks.router_costs``.

The router rows of ``make bench`` run four processes on 2 cores shared with
whatever else runs, so their ratio measures the scheduler as much as the
code.  This script measures the code: the caller, the hops and the backend
in ONE process and one event loop, over loopback TCP, so that every figure
is CPU time per call of the whole chain, and the chains compare directly:

* ``direct``: caller -> backend (plain grpclib);
* ``reverse tunnel``: the caller's call goes through a reverse tunnel to a
  device serving the benchmark service itself (``handler.as_channel()``):
  one tunnel hop where ``direct`` has one grpclib hop, what the router ->
  agent hop costs without the proxies on either side;
* ``noop relays``: caller -> relay -> relay -> backend, each relay a plain
  grpclib server whose Unary handler makes the same call with a plain
  grpclib client (bytes in, bytes out, nothing else): the floor of any
  relay built on grpclib, two extra grpclib hops;
* ``proxy relays``: the same two relays, each a ``tunnel.Proxy`` on a
  grpclib server forwarding to a grpclib channel (what the proxy costs
  over the no-op relay);
* ``router + agent``: the programs' own ``Router`` and ``Agent`` (metrics,
  key lookup, duplicate policy: everything but the process boundary), the
  agent's reverse tunnel carrying the router's calls.

Rounds alternate the variants; medians of the rounds.  ``--profile FILE``
also runs the router + agent chain under cProfile and writes its stats.

Last, the floor of any relay on h2 (what grpclib's HTTP/2 is): one unary
call's HTTP/2 work alone, each end priced apart, in memory (no socket, no
event loop, no gRPC layer), with grpclib's own h2 settings; then the
cheapest routed chain that floor allows: direct, plus a bare-h2 server end
and client end for the two hops, plus the reverse tunnel chain (both
tunnel ends), with proxies that cost nothing.

Not part of ``make bench``: it explains the router rows.  Rounds and
duration: ``--rounds`` (5), ``--seconds`` (1.5); ``--callers`` (1,16).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import cProfile
import pstats
import socket
import statistics
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpclib.client
import grpclib.server
import h2.config
import h2.connection
from grpclib.const import Cardinality, Handler
from grpclib.metadata import USER_AGENT

from tunnel import Proxy, install_fallback
from tunnel.raw import RawMessage

from .grpclib_side import SERVICE, BenchService, transport
from .protos import generate, load
from .workloads import UNARY_PAYLOAD

UNARY = SERVICE + "Unary"
KEY = "bench"

Call = Callable[[], Awaitable[Any]]


def _socket() -> socket.socket:
    # IPPROTO_TCP: asyncio sets TCP_NODELAY on accepted connections (GRPCLIB-NOTES 11).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _serve(server: grpclib.server.Server) -> int:
    sock = _socket()
    await server.start(sock=sock)
    port: int = sock.getsockname()[1]
    return port


class _NoopRelay:
    """Unary only, bytes in and out: the least a grpclib relay can do."""

    def __init__(self, channel: grpclib.client.Channel) -> None:
        self._method = grpclib.client.UnaryUnaryMethod(channel, UNARY, RawMessage, RawMessage)

    def __mapping__(self) -> dict[str, Handler]:
        return {UNARY: Handler(self._unary, Cardinality.UNARY_UNARY, RawMessage, RawMessage)}

    async def _unary(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        await stream.send_message(await self._method(request))


@contextlib.asynccontextmanager
async def _relays(
    backend_port: int, make: Callable[[grpclib.client.Channel], grpclib.server.Server]
) -> AsyncIterator[int]:
    """Two relays in a row in front of the backend; yields the first one's port."""
    channels: list[grpclib.client.Channel] = []
    servers: list[grpclib.server.Server] = []
    port = backend_port
    try:
        for _ in range(2):
            channel = grpclib.client.Channel("127.0.0.1", port)
            channels.append(channel)
            server = make(channel)
            servers.append(server)
            port = await _serve(server)
        yield port
    finally:
        for server in servers:
            server.close()
            await server.wait_closed()
        for channel in channels:
            channel.close()


def _noop_server(channel: grpclib.client.Channel) -> grpclib.server.Server:
    return grpclib.server.Server([_NoopRelay(channel)])


def _proxy_server(channel: grpclib.client.Channel) -> grpclib.server.Server:
    server = grpclib.server.Server([])
    install_fallback(server, Proxy(channel))
    return server


@contextlib.asynccontextmanager
async def _programs(backend_port: int) -> AsyncIterator[int]:
    """The programs' Router and Agent, in this process; yields the router's port."""
    from tunnel.cli import _parser
    from tunnel.cli._config import load_settings
    from tunnel.cli._settings import AGENT, ROUTER
    from tunnel.cli.agent import Agent
    from tunnel.cli.router import Router

    _, parsers = _parser()
    router_settings = load_settings(
        parsers["router"], ROUTER, ["--listen", "127.0.0.1:0"], command="router"
    )
    router = Router(router_settings, None)
    server = router.server()
    port = await _serve(server)
    agent_settings = load_settings(
        parsers["agent"],
        AGENT,
        ["--router", f"127.0.0.1:{port}", "--backend", f"127.0.0.1:{backend_port}", "--key", KEY],
        command="agent",
    )
    agent = Agent(agent_settings)
    serving = [asyncio.create_task(agent.serve(link)) for link in agent.links]
    try:
        deadline = time.monotonic() + 10
        while not router.by_key.get(KEY):
            if time.monotonic() > deadline:
                raise RuntimeError("the agent did not register")
            await asyncio.sleep(0.01)
        yield port
    finally:
        await agent.stop(0.0)
        for task in serving:
            task.cancel()
        await asyncio.gather(*serving, return_exceptions=True)
        agent.close_channels()
        server.close()
        await server.wait_closed()


async def _per_call(
    call: Call, callers: int, seconds: float, profile: cProfile.Profile | None = None
) -> tuple[float, int]:
    """CPU microseconds per call (of this process, which does all the work).

    CPU time rather than wall-clock time: on a machine shared with other
    work, the wall clock also counts the time others had the core.
    """

    async def loop(until: float) -> int:
        done = 0
        while time.perf_counter() < until:
            await call()
            done += 1
        return done

    await asyncio.gather(*(loop(time.perf_counter() + 0.2) for _ in range(callers)))
    if profile is not None:
        profile.enable()
    start, cpu = time.perf_counter(), time.process_time()
    counts = await asyncio.gather(*(loop(start + seconds) for _ in range(callers)))
    if profile is not None:
        profile.disable()
    return (time.process_time() - cpu) / sum(counts) * 1e6, sum(counts)


VARIANTS = ("direct", "reverse tunnel", "noop relays", "proxy relays", "router + agent")


async def _measure(pb: Any, args: argparse.Namespace) -> dict[str, dict[int, list[float]]]:
    callers = [int(c) for c in args.callers.split(",")]
    results: dict[str, dict[int, list[float]]] = {v: {c: [] for c in callers} for v in VARIANTS}
    backend = grpclib.server.Server([BenchService(pb)])
    backend_port = await _serve(backend)
    try:
        async with (
            transport("reverse", pb) as reverse,
            _relays(backend_port, _noop_server) as noop_port,
            _relays(backend_port, _proxy_server) as proxy_port,
            _programs(backend_port) as router_port,
        ):
            ports = {
                "direct": backend_port,
                "noop relays": noop_port,
                "proxy relays": proxy_port,
                "router + agent": router_port,
            }
            metadata = {"tunnel-key": KEY}
            channels = {v: grpclib.client.Channel("127.0.0.1", p) for v, p in ports.items()}
            channels["reverse tunnel"] = reverse.channel
            try:
                calls: dict[str, Call] = {}
                for variant, channel in channels.items():
                    method = grpclib.client.UnaryUnaryMethod(channel, UNARY, pb.Message, pb.Message)
                    request = pb.Message(payload=UNARY_PAYLOAD)
                    calls[variant] = _unary_call(method, request, metadata)
                for _ in range(args.rounds):
                    for variant in args.variants:
                        for n in callers:
                            cost, _ = await _per_call(calls[variant], n, args.seconds)
                            results[variant][n].append(cost)
                if args.profile:
                    profile = cProfile.Profile()
                    profiled = 0
                    for n in callers:
                        _, done = await _per_call(calls["router + agent"], n, args.seconds, profile)
                        profiled += done
                    profile.dump_stats(args.profile)
                    _print_counts(pstats.Stats(profile), profiled)
            finally:
                for channel in channels.values():
                    channel.close()
    finally:
        backend.close()
        await backend.wait_closed()
    return results


#: What the profile counts per call of the whole chain (caller and backend
#: included): (label, (file suffix, function name)).
COUNTED = (
    ("event-loop iterations", ("base_events.py", "_run_once")),
    ("socket sends", ("~", "<method 'send' of '_socket.socket' objects>")),
    ("socket receives", ("~", "<method 'recv' of '_socket.socket' objects>")),
    ("tasks created", ("base_events.py", "create_task")),
    ("h2 frames received", ("h2/connection.py", "_receive_frame")),
)


def _print_counts(stats: pstats.Stats, calls: int) -> None:
    """Operations per call of the router + agent chain, from its profile."""
    table: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    print(f"per call of the router + agent chain, caller and backend included ({calls} calls):")
    for label, (suffix, function) in COUNTED:
        count = sum(
            row[1]
            for (file, _, name), row in table.items()
            if name == function and file.endswith(suffix)
        )
        print(f"  {label:24} {count / max(calls, 1):5.1f}")


#: Headers as grpclib sends them for a unary call to the router (payload: UNARY_PAYLOAD).
_REQUEST_HEADERS = [
    (":method", "POST"),
    (":scheme", "http"),
    (":path", UNARY),
    (":authority", "127.0.0.1:50051"),
    ("te", "trailers"),
    ("content-type", "application/grpc"),
    ("user-agent", USER_AGENT),
    ("tunnel-key", KEY),
]
_RESPONSE_HEADERS = [(":status", "200"), ("content-type", "application/grpc")]
_TRAILERS = [("grpc-status", "0")]


def _h2_ends(calls: int) -> tuple[float, float]:
    """CPU microseconds per unary call of h2 alone: (client end, server end).

    Each end's share is timed apart: the client sends headers and the
    message, the server reads them and answers with headers, the message
    and trailers, the client reads the answer; each acknowledges what it
    read, as grpclib does.  The configuration is grpclib's (no header
    validation or normalisation).
    """

    def config(client_side: bool) -> h2.config.H2Configuration:
        return h2.config.H2Configuration(
            client_side=client_side,
            header_encoding="ascii",
            validate_inbound_headers=False,
            validate_outbound_headers=False,
            normalize_inbound_headers=False,
            normalize_outbound_headers=False,
        )

    client = h2.connection.H2Connection(config(True))
    server = h2.connection.H2Connection(config(False))
    client.initiate_connection()
    server.initiate_connection()
    for _ in range(2):
        server.receive_data(client.data_to_send())
        client.receive_data(server.data_to_send())
    message = len(UNARY_PAYLOAD).to_bytes(5, "big") + UNARY_PAYLOAD
    client_cpu = server_cpu = 0.0
    for _ in range(calls):
        start = time.process_time()
        stream_id = client.get_next_available_stream_id()
        client.send_headers(stream_id, _REQUEST_HEADERS)
        client.send_data(stream_id, message, end_stream=True)
        request = client.data_to_send()
        middle = time.process_time()
        server.receive_data(request)
        server.acknowledge_received_data(len(message), stream_id)
        server.send_headers(stream_id, _RESPONSE_HEADERS)
        server.send_data(stream_id, message)
        server.send_headers(stream_id, _TRAILERS, end_stream=True)
        response = server.data_to_send()
        answered = time.process_time()
        client.receive_data(response)
        client.acknowledge_received_data(len(message), stream_id)
        acknowledgement = client.data_to_send()
        end = time.process_time()
        server.receive_data(acknowledgement)  # keeps the window open; not timed
        client_cpu += (middle - start) + (end - answered)
        server_cpu += answered - middle
    return client_cpu / calls * 1e6, server_cpu / calls * 1e6


def _print_h2_floor(results: dict[str, dict[int, list[float]]], rounds: int) -> None:
    ends = [_h2_ends(5000) for _ in range(rounds)]
    client = statistics.median(c for c, _ in ends)
    server = statistics.median(s for _, s in ends)
    print(
        f"h2 alone, µs per unary call (in memory, median of {rounds}): "
        f"client end {client:.0f}, server end {server:.0f}"
    )
    if not results["reverse tunnel"][next(iter(results["direct"]))]:
        return
    print("floor of the routed chain on bare h2 (direct + h2 server and client ends")
    print("+ reverse tunnel; no grpclib, proxies free):")
    for n, costs in results["direct"].items():
        direct = statistics.median(costs)
        floor = direct + client + server + statistics.median(results["reverse tunnel"][n])
        print(f"  {n:3} caller(s): {floor:6.0f} µs, {direct / floor:4.2f}x of direct in calls/s")


def _unary_call(method: Any, request: Any, metadata: dict[str, str]) -> Call:
    async def call() -> None:
        await method(request, metadata=metadata)

    return call


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.router_costs")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.5)
    parser.add_argument("--callers", default="1,16")
    parser.add_argument("--loop", choices=("asyncio", "uvloop"), default="asyncio")
    parser.add_argument("--profile", help="write cProfile stats of the router + agent chain")
    parser.add_argument(
        "--only", help="comma-separated variants (direct is always measured): " + ",".join(VARIANTS)
    )
    args = parser.parse_args()
    wanted = args.only.split(",") if args.only else VARIANTS
    if set(wanted) - set(VARIANTS):
        parser.error(f"unknown variants: {', '.join(sorted(set(wanted) - set(VARIANTS)))}")
    # The direct chain is every ratio's reference.
    args.variants = ["direct", *(v for v in VARIANTS[1:] if v in wanted)]
    with tempfile.TemporaryDirectory() as tmp:
        generate(Path(tmp))
        pb, _ = load(Path(tmp))
        if args.loop == "uvloop":
            import uvloop

            runner = asyncio.Runner(loop_factory=uvloop.new_event_loop)
        else:
            runner = asyncio.Runner()
        with runner:
            results = runner.run(_measure(pb, args))
    callers = [int(c) for c in args.callers.split(",")]
    print(f"µs per unary call, whole chain in one process ({args.loop}), median of {args.rounds}")
    header = "".join(f"{f'{n} caller(s)':>22}" for n in callers)
    print(f"{'':16}{header}")
    for variant in args.variants:
        cells = []
        for n in callers:
            value = statistics.median(results[variant][n])
            base = statistics.median(results["direct"][n])
            cells.append(f"{value:10.0f} ({value / base:4.2f}x)".rjust(22))
        print(f"{variant:16}{''.join(cells)}")
    _print_h2_floor(results, args.rounds)


if __name__ == "__main__":
    main()
