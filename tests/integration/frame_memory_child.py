"""One end of a tunnel in a process of its own, reporting its memory.

Run as a script (``python tests/integration/frame_memory_child.py ROLE
[PORT]``) by ``test_frame_memory.py``; it imports only ``tunnel`` and
grpclib, so that it can also run against another checkout of ``tunnel``
(``PYTHONPATH=/path/to/checkout``) to measure that checkout.

Roles, and what the test's hostile peer does to them:

* ``server``: serve ``TunnelServiceHandler`` (forward and reverse tunnels)
  on 127.0.0.1 (port 0), print ``{"port": ..., "rss_kib": ...}``, then
  wait for a line on stdin (the peer is done) and print
  ``{"hwm_kib": ..., "rss_kib": ...}``.
* ``forward-client`` / ``device``: open a forward tunnel (or serve a
  reverse one) to the peer's server on PORT, print ``{"rss_kib": ...}``
  first, then ``{"hwm_kib": ..., "rss_kib": ..., "outcome": ...}`` once the
  tunnel ended.

``rss_kib`` is VmRSS; ``hwm_kib`` is VmHWM, the peak, reset (through
``/proc/self/clear_refs``) just before the first report, so it is the peak
*during* the peer's attack.
"""

from __future__ import annotations

import asyncio
import gc
import json
import socket
import sys
from pathlib import Path

import grpclib.client
import grpclib.server

import tunnel
from tunnel.testing import TestService

#: No role may take longer than this (seconds).
TIMEOUT = 60.0


def _status() -> dict[str, int]:
    fields = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0])
    return fields


def _reset_peak() -> None:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")


def _report(**fields: object) -> None:
    print(json.dumps(fields), flush=True)


def _now() -> dict[str, int]:
    status = _status()
    return {"rss_kib": status["VmRSS"], "hwm_kib": status["VmHWM"]}


async def _serve() -> None:
    server = grpclib.server.Server([tunnel.TunnelServiceHandler([TestService()])])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    await server.start(sock=sock)
    _reset_peak()
    _report(port=sock.getsockname()[1], rss_kib=_status()["VmRSS"])
    loop = asyncio.get_running_loop()
    await loop.run_in_executor(None, sys.stdin.readline)
    _report(**_now())
    server.close()
    await server.wait_closed()


async def _forward_client(port: int) -> None:
    channel = grpclib.client.Channel("127.0.0.1", port)
    _reset_peak()
    _report(rss_kib=_status()["VmRSS"])
    try:
        async with tunnel.open_tunnel(channel) as tunneled:
            await tunneled.wait_closed()
            outcome = repr(tunneled.error)
    except Exception as exc:
        outcome = repr(exc)
    _report(outcome=outcome, **_now())
    channel.close()


async def _device(port: int) -> None:
    channel = grpclib.client.Channel("127.0.0.1", port)
    _reset_peak()
    _report(rss_kib=_status()["VmRSS"])
    device = tunnel.ReverseTunnelServer(channel, [TestService()])
    try:
        await device.serve()
        outcome = "ended without an error"
    except Exception as exc:
        outcome = repr(exc)
    _report(outcome=outcome, **_now())
    channel.close()


async def main(role: str, port: int | None) -> None:
    async with asyncio.timeout(TIMEOUT):
        if role == "server":
            await _serve()
        elif role == "forward-client":
            assert port is not None
            await _forward_client(port)
        elif role == "device":
            assert port is not None
            await _device(port)
        else:
            raise SystemExit(f"unknown role {role!r}")


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]) if len(sys.argv) > 2 else None))
