"""Cross-implementation tests with grpctunnel-py 0.3.0 (grpcio), forward and reverse.

grpctunnel-py cannot be imported next to ``tunnel`` (both register
``grpctunnel/v1/tunnel.proto`` in protobuf's default pool, with different
bytes), so its side always runs in a subprocess (``grpctunnel_py_peer.py``)
and the two talk over loopback:

- our tunnel client -> its network server, forward: our conformance cases
  through a forward tunnel, and our client program's load;
- its tunnel client -> our network server (``python -m tunnel.testing.server``),
  forward: the peer's scenarios through its forward tunnel;
- our ReverseTunnelServer -> its network server: our client program with
  ``--tunnel-type reverse``; the peer's TriggerTestRPCs runs its scenarios
  over our reverse tunnel;
- its ReverseTunnelServer -> our network server: our conformance cases over
  the handler's ``key_as_channel``.

Each with flow control on and off. Where grpctunnel-py breaks the protocol
or the contract, the test keeps to the reference's behaviour and is marked
``xfail(strict=True, reason="known peer bug: ...")``.

The in-process halves run their own event loop in a worker thread from a
module-scoped fixture, so each peer process (and tunnel) serves all the cases
of one configuration: grpctunnel-py's network server accepts only one forward
tunnel per process (see ``PEER_BUG_ONE_TUNNEL``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import importlib.util
import json
import subprocess
import sys
from collections.abc import Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any, TypeVar

import grpclib.client
import grpclib.server
import pytest

import tunnel
from tests.interop.programs import (
    DURATION,
    ROOT,
    _env,
    count_of,
    free_port,
    run_program,
    running_server,
)
from tunnel.testing import conformance
from tunnel.testing.server import client_key
from tunnel.testing.service import TestService

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("grpctunnel") is None, reason="grpctunnel-py is not installed"
)

T = TypeVar("T")

PEER = str(Path(__file__).with_name("grpctunnel_py_peer.py"))
FLOW_CONTROL = [pytest.param(False, id="fc"), pytest.param(True, id="nofc")]
PEER_TIMEOUT = 30.0
CASE_TIMEOUT = 5.0

PEER_BUG_DETAILS = (
    "known peer bug: grpctunnel-py drops error details (google.rpc.Status.details): "
    "its server keeps only code and message, its client never reads them"
)
PEER_BUG_ONE_TUNNEL = (
    "known peer bug: grpctunnel-py's TunnelServiceHandler shares one stream-ID "
    "counter among all forward tunnels, so every tunnel after the first fails "
    "('cannot create stream ID 1: that ID has already been used')"
)


def in_thread(coro: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run *coro* to completion on a fresh event loop in a worker thread."""
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        return pool.submit(asyncio.run, coro()).result(timeout=120)


async def run_cases(channel: grpclib.client.Channel) -> dict[str, Any]:
    """Every conformance case on *channel*; a case that crashes is recorded, not raised."""
    results: dict[str, Any] = {}
    for case in conformance.CASES:
        try:
            # Each case in a task of its own, as each test of tests/conformance
            # is: a case must not see what an earlier case left on its task
            # (after deadline_exceeded the task's cancelling() count is 1, and
            # cancel_bidi would then re-raise its call's CancelledError).
            results[case.name] = await asyncio.create_task(
                conformance.run_case(case, channel, timeout=CASE_TIMEOUT)
            )
        except BaseException as exc:  # a crash is this case's result
            results[case.name] = conformance.CaseResult(status=None, error=f"crashed: {exc!r}")
    return results


def peer_args(mode: str, port: int, nofc: bool, *extra: str) -> list[str]:
    args = [PEER, mode, "--port", str(port), *extra]
    return [*args, "--no-flow-control"] if nofc else args


@contextlib.contextmanager
def peer_server(nofc: bool) -> Iterator[Any]:
    port = free_port()
    with running_server(peer_args("server", port, nofc), port, ready="listening") as server:
        yield server


def peer_results(log: str) -> dict[str, Any]:
    """The last JSON line the peer printed."""
    lines = [line for line in log.splitlines() if line.startswith("{")]
    assert lines, f"the peer printed no results:\n{log}"
    result: dict[str, Any] = json.loads(lines[-1])
    return result


# -- what the peer's scenarios must observe (shared/INTEROP.md) ------------------------


def _reply(payload: bytes, count: int = 0, headers: dict[str, bytes] | None = None) -> Any:
    return {
        "payload": payload.hex(),
        "count": count,
        "headers": sorted([k, v.hex()] for k, v in (headers or {}).items()),
    }


EXPECTED: dict[str, Any] = {
    "unary_metadata": _reply(
        b"hello, tunnel",
        headers={
            "x-req-single": b"alpha",
            "x-req-multi": b"two",
            "x-req-data-bin": b"\x00\x01\x02\x03",
        },
    ),
    "unary_error": {
        "code": 9,
        "message": "error",
        "trailers": [["x-err-trailer", b"err-tlr-val".hex()]],
        "details": [
            "type.googleapis.com/google.rpc.ErrorInfo",
            "type.googleapis.com/google.protobuf.StringValue",
        ],
    },
    "client_stream": _reply(b"cs-4", count=5),
    "server_stream": [_reply(b"ss")] * 5,
    "server_stream_error": {
        "replies": [_reply(b"ss")] * 2,
        "code": 5,
        "message": "error",
        "trailers": [],
        "details": [],
    },
    "bidi": {"replies": [_reply(f"bidi-{i}".encode(), count=i + 1) for i in range(5)], "end": True},
    "large_unary": {"size": 100_000, "same": True},
}


def check_scenario(results: dict[str, Any], name: str) -> None:
    got = dict(results[name]) if isinstance(results[name], dict) else results[name]
    expected = EXPECTED[name]
    if name == "unary_error":
        # Details are checked on their own (test_*_error_details).
        got.pop("details", None)
        expected = {k: v for k, v in expected.items() if k != "details"}
    assert got == expected


SCENARIOS = [name for name in EXPECTED]


# -- its tunnel client -> our network server, forward ----------------------------------


@pytest.fixture(scope="module", params=FLOW_CONTROL)
def peer_client_results(request: pytest.FixtureRequest) -> dict[str, Any]:
    nofc: bool = request.param
    port = free_port()
    args = ["-m", "tunnel.testing.server", "--port", str(port)]
    if nofc:
        args.append("--no-flow-control")
    with running_server(args, port, ready="Listening on"):
        done = subprocess.run(
            [sys.executable, *peer_args("client", port, nofc)],
            capture_output=True,
            text=True,
            timeout=PEER_TIMEOUT,
            env=_env(),
            cwd=ROOT,
        )
    assert done.returncode == 0, done.stderr
    results: dict[str, Any] = peer_results(done.stdout)["results"]
    return results


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_peer_client_forward(peer_client_results: dict[str, Any], scenario: str) -> None:
    check_scenario(peer_client_results, scenario)


@pytest.mark.xfail(strict=True, reason=PEER_BUG_DETAILS)
def test_peer_client_forward_error_details(peer_client_results: dict[str, Any]) -> None:
    assert peer_client_results["unary_error"]["details"] == EXPECTED["unary_error"]["details"]


# -- our ReverseTunnelServer -> its network server (our client program) ----------------


@pytest.fixture(scope="module", params=FLOW_CONTROL)
def reverse_to_peer(request: pytest.FixtureRequest) -> tuple[Any, dict[str, Any]]:
    nofc: bool = request.param
    with peer_server(nofc) as server:
        args = ["-m", "tunnel.testing.client", "--server-port", str(server.port)]
        args += ["--tunnel-type", "reverse", "--duration", DURATION]
        if nofc:
            args.append("--no-flow-control")
        client = run_program(args)
        log = server.log()
    return client, peer_results(log)["results"]


def test_our_client_program_reverse_to_peer(reverse_to_peer: tuple[Any, Any]) -> None:
    client, _ = reverse_to_peer
    assert client.returncode == 0, client.stderr
    served = count_of(r"Served (\d+) requests over reverse tunnel\.", client.lines)
    assert served == len(EXPECTED)  # one call per scenario


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_peer_server_reverse(reverse_to_peer: tuple[Any, Any], scenario: str) -> None:
    check_scenario(reverse_to_peer[1], scenario)


@pytest.mark.xfail(strict=True, reason=PEER_BUG_DETAILS)
def test_peer_server_reverse_error_details(reverse_to_peer: tuple[Any, Any]) -> None:
    assert reverse_to_peer[1]["unary_error"]["details"] == EXPECTED["unary_error"]["details"]


# -- our tunnel client -> its network server, forward ----------------------------------


@pytest.mark.parametrize("nofc", FLOW_CONTROL)
def test_our_client_program_forward_to_peer(nofc: bool) -> None:
    with peer_server(nofc) as server:
        args = ["-m", "tunnel.testing.client", "--server-port", str(server.port)]
        args += ["--tunnel-type", "forward", "--duration", DURATION]
        if nofc:
            args.append("--no-flow-control")
        client = run_program(args)
    assert client.returncode == 0, client.stderr
    assert client.lines[0] == "Tunnel created."
    assert count_of(r"Issued (\d+) requests over tunnel\.", client.lines) > 0


@pytest.mark.xfail(strict=True, reason=PEER_BUG_ONE_TUNNEL)
def test_second_forward_tunnel_to_peer() -> None:
    async def two_tunnels() -> None:
        channel = grpclib.client.Channel("127.0.0.1", server.port)
        try:
            for _ in range(2):
                async with tunnel.open_tunnel(channel) as tunnel_channel:
                    result = await conformance.run_case(conformance.CASES[0], tunnel_channel)
                    conformance.CASES[0].check(result)
        finally:
            channel.close()

    with peer_server(False) as server:
        in_thread(two_tunnels)


@pytest.fixture(scope="module", params=FLOW_CONTROL)
def conformance_via_peer_server(request: pytest.FixtureRequest) -> dict[str, Any]:
    nofc: bool = request.param
    options = tunnel.TunnelOptions(disable_flow_control=nofc)

    async def run() -> dict[str, Any]:
        channel = grpclib.client.Channel("127.0.0.1", server.port)
        try:
            async with tunnel.open_tunnel(channel, options=options) as tunnel_channel:
                return await run_cases(tunnel_channel)
        finally:
            channel.close()

    with peer_server(nofc) as server:
        return in_thread(run)


# -- its ReverseTunnelServer -> our network server -------------------------------------


@pytest.fixture(scope="module", params=FLOW_CONTROL)
def conformance_via_peer_reverse(request: pytest.FixtureRequest) -> dict[str, Any]:
    nofc: bool = request.param
    options = tunnel.TunnelOptions(disable_flow_control=nofc)
    key = f"peer-{'nofc' if nofc else 'fc'}"

    async def run() -> dict[str, Any]:
        handler = tunnel.TunnelServiceHandler(
            [TestService()], affinity_key=client_key, options=options
        )
        server = grpclib.server.Server([handler])
        port = free_port()
        await server.start("127.0.0.1", port)
        peer = await asyncio.create_subprocess_exec(
            sys.executable,
            *peer_args("reverse-client", port, nofc, "--key", key),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env=_env(),
            cwd=ROOT,
        )
        try:
            channel = handler.key_as_channel(key)
            async with asyncio.timeout(PEER_TIMEOUT):
                await channel.wait_ready()
            return await run_cases(channel)
        finally:
            assert peer.stdin is not None
            peer.stdin.close()
            try:
                async with asyncio.timeout(10):
                    await peer.wait()
            except TimeoutError:
                peer.kill()
                await peer.wait()
            handler.initiate_shutdown()
            server.close()
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(5):
                    await server.wait_closed()

    return in_thread(run)


PEER_BUG_BIN = (
    "known peer bug: grpctunnel-py converts -bin metadata values with latin-1 instead "
    "of carrying their raw bytes, so non-ASCII binary values are corrupted both ways"
)
PEER_BUG_EMPTY = (
    "known peer bug: grpctunnel-py never sends a zero-length message (its chunking "
    "loop sends nothing for 0 bytes), so an empty reply never arrives"
)

# Conformance cases that grpctunnel-py fails, by (direction, case name); the
# same in both directions, since its tunnel server is one class.
CONFORMANCE_XFAIL: dict[tuple[str, str], str] = {
    (direction, name): reason
    for direction in ("forward", "reverse")
    for name, reason in {
        "unary_metadata": PEER_BUG_BIN,
        "unary_headers_trailers": PEER_BUG_BIN,
        "unary_error_details": PEER_BUG_DETAILS,
        "client_stream_empty": PEER_BUG_EMPTY,
        "use_external_message_twice": PEER_BUG_EMPTY,
    }.items()
}


def _conformance_params(direction: str) -> list[Any]:
    params = []
    for case in conformance.CASES:
        reason = CONFORMANCE_XFAIL.get((direction, case.name))
        marks = [pytest.mark.xfail(strict=True, reason=reason)] if reason else []
        params.append(pytest.param(case, id=case.name, marks=marks))
    return params


@pytest.mark.parametrize("case", _conformance_params("forward"))
def test_conformance_forward_to_peer_server(
    conformance_via_peer_server: dict[str, Any], case: conformance.Case
) -> None:
    case.check(conformance_via_peer_server[case.name])


@pytest.mark.parametrize("case", _conformance_params("reverse"))
def test_conformance_reverse_from_peer_client(
    conformance_via_peer_reverse: dict[str, Any], case: conformance.Case
) -> None:
    case.check(conformance_via_peer_reverse[case.name])
