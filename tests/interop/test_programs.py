"""Our interop programs paired with each other, as the reference's are paired.

``python -m tunnel.testing.client`` against ``python -m tunnel.testing.server``
with flow control on, off, and off on one side only; each must exit 0 and log
the reference's lines with counts above zero. Plus the failures the reference
programs report with status 1: a bad ``-tunnel-type`` and a busy port.
"""

from __future__ import annotations

import re
import socket

import pytest

from tests.interop.programs import (
    DURATION,
    count_of,
    free_port,
    log_lines,
    run_program,
    running_server,
)

SERVER = "tunnel.testing.server"
CLIENT = "tunnel.testing.client"
KEY = r"[0-9a-f]{64}"


def server_args(port: int, *, no_flow_control: bool = False, go_style: bool = False) -> list[str]:
    dash = "-" if go_style else "--"
    args = ["-m", SERVER, f"{dash}port", str(port), f"{dash}duration", DURATION]
    return [*args, f"{dash}no-flow-control"] if no_flow_control else args


def client_args(
    port: int, *, no_flow_control: bool = False, tunnel_type: str | None = None
) -> list[str]:
    args = ["-m", CLIENT, "--server-port", str(port), "--duration", DURATION]
    if no_flow_control:
        args.append("--no-flow-control")
    if tunnel_type is not None:
        args += ["--tunnel-type", tunnel_type]
    return args


@pytest.mark.parametrize(
    ("server_nofc", "client_nofc"),
    [(False, False), (True, True), (True, False), (False, True)],
    ids=["fc", "nofc", "servernofc", "clientnofc"],
)
def test_client_against_server(server_nofc: bool, client_nofc: bool) -> None:
    port = free_port()
    with running_server(
        server_args(port, no_flow_control=server_nofc), port, ready="Listening on"
    ) as server:
        client = run_program(client_args(port, no_flow_control=client_nofc))
        assert client.returncode == 0, client.stderr
        lines = client.lines
        assert lines[0] == "Tunnel created."
        issued = count_of(r"Issued (\d+) requests over tunnel\.", lines)
        assert re.fullmatch(rf"Reverse tunnel started \(key = {KEY}\)\.", lines[2])
        key = lines[2].split("key = ")[1].rstrip(").")
        served = count_of(r"Served (\d+) requests over reverse tunnel\.", lines)
        assert lines[3] == f"Served {served} requests over reverse tunnel."
        assert len(lines) == 4, lines
        assert issued > 0
        assert served > 0
        server_lines = log_lines(server.log())
    assert server_lines == [
        f"Listening on 127.0.0.1:{port}",
        f"Sending RPCs over reverse tunnel to {key}",
    ]


@pytest.mark.parametrize("tunnel_type", ["forward", "reverse"])
def test_one_tunnel_type(tunnel_type: str) -> None:
    port = free_port()
    with running_server(server_args(port, go_style=True), port, ready="Listening on") as server:
        # Go's flag spelling, single dash and `=`, as scripts for the reference use it.
        client = run_program(
            [
                "-m",
                CLIENT,
                f"-server-port={port}",
                "-duration",
                DURATION,
                "-tunnel-type",
                tunnel_type,
            ]
        )
        assert client.returncode == 0, client.stderr
        lines = client.lines
        server_lines = log_lines(server.log())
    if tunnel_type == "forward":
        assert lines[0] == "Tunnel created."
        assert count_of(r"Issued (\d+) requests over tunnel\.", lines) > 0
        assert len(lines) == 2
        assert server_lines == [f"Listening on 127.0.0.1:{port}"]
    else:
        assert re.fullmatch(rf"Reverse tunnel started \(key = {KEY}\)\.", lines[0])
        assert count_of(r"Served (\d+) requests over reverse tunnel\.", lines) > 0
        assert len(lines) == 2
        assert len(server_lines) == 2


@pytest.mark.parametrize("spelling", ["--tunnel-type", "-tunnel-type"])
def test_bad_tunnel_type(spelling: str) -> None:
    client = run_program(["-m", CLIENT, spelling, "sideways", "--server-port", "1"])
    assert client.returncode == 1
    assert client.lines == [
        'tunnel type "sideways" is not valid; must be one of "forward", "reverse", or "both"'
    ]


def test_server_port_busy() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        server = run_program(["-m", SERVER, "--port", str(port)], timeout=10)
    assert server.returncode == 1
    assert server.lines == [f"listen tcp 127.0.0.1:{port}: bind: address already in use"]


def test_client_without_server() -> None:
    """Nothing listens: the client gives up after its 5 s dial limit, status 1."""
    port = free_port()
    client = run_program(client_args(port), timeout=15)
    assert client.returncode == 1
    assert client.lines[-1].startswith(f"dial tcp 127.0.0.1:{port}: ")


def test_trigger_without_reverse_tunnel() -> None:
    """TriggerTestRPCs for a key no reverse tunnel has fails after its 1 s wait."""
    port = free_port()
    script = (
        "import asyncio, grpclib.client\n"
        "from grpclib.exceptions import GRPCError\n"
        "from tunnel.testing._pb import TriggerTestRpCsRequest, TunnelTestServiceStub\n"
        "async def main():\n"
        f"    channel = grpclib.client.Channel('127.0.0.1', {port})\n"
        "    try:\n"
        "        await TunnelTestServiceStub(channel).trigger_test_rp_cs(\n"
        "            TriggerTestRpCsRequest(client_key='nobody'))\n"
        "    except GRPCError as exc:\n"
        "        print(exc.status.name)\n"
        "    finally:\n"
        "        channel.close()\n"
        "asyncio.run(main())\n"
    )
    with running_server(server_args(port), port, ready="Listening on"):
        caller = run_program(["-c", script], timeout=10)
    assert caller.returncode == 0, caller.stderr
    assert caller.stdout.strip() == "DEADLINE_EXCEEDED"
