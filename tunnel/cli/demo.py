"""``python -m tunnel.cli.demo`` (``make demo``): a device behind NAT, reached by key.

Four real processes on 127.0.0.1, every port chosen by the kernel:

1. a backend: ``grpchantesting.TestService``, a betterproto service, on a
   plain gRPC port (``python -m tunnel.testing.backend``);
2. ``grpctunnel router``, with an agent tokens file;
3. ``grpctunnel agent`` next to the backend: it dials out to the router
   and registers under the key ``kitchen`` with its token;
4. this process, the caller: an ordinary gRPC client of the backend's
   service that only adds ``tunnel-key: kitchen`` and dials the router.

Then it prints the router's ``/tunnels`` and a few of its metrics, and
stops every process by PID (SIGTERM: each drains and exits 0).  The log
lines of the router and the agent are shown as they come.  Needs the
``router`` and ``testing`` extras (``make install`` has both).
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import urllib.request
from pathlib import Path
from typing import Any

from grpclib.client import Channel
from grpclib.exceptions import GRPCError

from tunnel.cli._tokens import hash_token

#: Seconds any one step may take.
STEP = 20.0
KEY = "kitchen"


class Program:
    """A child process whose output lines are echoed, labelled, and kept for waiting."""

    def __init__(self, label: str, *args: str) -> None:
        self.label = label
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
        )
        self.lines: queue.Queue[dict[str, Any]] = queue.Queue()
        self._echo = threading.Thread(target=self._read, daemon=True)
        self._echo.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for raw in self.process.stdout:
            try:
                line = json.loads(raw)
            except ValueError:
                line = {"message": raw.strip()}
            if not isinstance(line, dict):
                line = {"message": raw.strip()}
            self.lines.put(line)
            print(f"  {self.label:>7} | {_render(line)}", flush=True)

    def wait_for(self, wanted: str) -> dict[str, Any]:
        """The next line whose event (or message) is ``wanted``."""
        while True:
            try:
                line = self.lines.get(timeout=STEP)
            except queue.Empty:
                raise SystemExit(f"demo: the {self.label} did not say {wanted!r} in time") from None
            if wanted in (line.get("event"), line.get("message", "").split(" ")[0]):
                return line

    def stop(self) -> int:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
        try:
            status = self.process.wait(timeout=STEP)
        except subprocess.TimeoutExpired:
            os.kill(self.process.pid, signal.SIGKILL)
            status = self.process.wait()
        self._echo.join(timeout=STEP)
        return status


def _render(line: dict[str, Any]) -> str:
    skip = {"time", "level", "logger", "event", "message"}
    fields = " ".join(f"{k}={v}" for k, v in line.items() if k not in skip and v is not None)
    return f"{line.get('message', '')} {fields}".strip()


def _get(admin: str, path: str) -> str:
    with urllib.request.urlopen(f"http://{admin}{path}", timeout=STEP) as reply:
        body: bytes = reply.read()
    return body.decode()


async def call_through_router(router_port: int) -> None:
    from tunnel.testing import Message, TestServiceStub

    channel = Channel("127.0.0.1", router_port)
    stub = TestServiceStub(channel)
    routed = {"tunnel-key": KEY}
    try:
        async with asyncio.timeout(STEP):
            reply = await stub.unary(Message(payload=b"hello, kitchen"), metadata=routed)
            print(f"caller: unary through the router -> {reply.payload!r}")
            replies = [
                r
                async for r in stub.server_stream(
                    Message(payload=b"tick", count=3), metadata=routed
                )
            ]
            print(f"caller: server streaming -> {len(replies)} messages")
            for metadata in (routed, {"tunnel-key": "attic"}, {}):
                try:
                    await stub.unary(Message(code=9), metadata=metadata)
                except GRPCError as exc:
                    named = metadata.get("tunnel-key", "no key")
                    print(f"caller: {named}: {exc.status.name} ({exc.message})")
    finally:
        channel.close()


def main() -> int:
    programs: list[Program] = []
    with tempfile.TemporaryDirectory(prefix="grpctunnel-demo-") as tmp:
        token = Path(tmp, "agent.token")
        token.write_text("demo-token-not-for-production\n")
        tokens = Path(tmp, "agent-tokens.toml")
        digest = hash_token(token.read_text().strip())
        tokens.write_text(
            f'[[agents]]\nname = "demo devices"\ntoken-sha256 = "{digest}"\nkeys = ["kitchen"]\n'
        )
        try:
            print("starting the backend (TestService on a plain gRPC port)")
            backend = Program("backend", "-m", "tunnel.testing.backend", "--listen", "127.0.0.1:0")
            programs.append(backend)
            backend_address = backend.wait_for("listening")["message"].split()[1]

            print("starting the router")
            json_logs = ("--log-format", "json")
            router = Program(
                "router", "-m", "tunnel", "router", "--listen", "127.0.0.1:0",
                "--admin", "127.0.0.1:0", "--agent-tokens", str(tokens), *json_logs,
            )  # fmt: skip
            programs.append(router)
            listening = router.wait_for("router_listening")
            router_address, admin = listening["grpc"], listening["admin"]

            print(f"starting the agent in front of the backend, key {KEY!r}")
            agent = Program(
                "agent", "-m", "tunnel", "agent", "--router", router_address,
                "--backend", backend_address, "--key", KEY, "--token-file", str(token), *json_logs,
            )  # fmt: skip
            programs.append(agent)
            router.wait_for("tunnel_opened")

            asyncio.run(call_through_router(int(router_address.rpartition(":")[2])))

            print(f"\nGET http://{admin}/tunnels")
            print(_get(admin, "/tunnels"))
            print(f"GET http://{admin}/metrics (a few)")
            for line in _get(admin, "/metrics").splitlines():
                if line.startswith(
                    (
                        "grpctunnel_router_tunnels ",
                        "grpctunnel_router_calls_total",
                        "grpctunnel_router_tunnel_streams_opened_total",
                        "grpctunnel_router_tunnel_sent_bytes_total",
                        "grpctunnel_router_tunnel_received_bytes_total",
                    )
                ):
                    print(f"  {line}")
            print()
        finally:
            for program in reversed(programs):
                status = program.stop()
                print(
                    f"stopped the {program.label} (pid {program.process.pid}): exit status {status}"
                )
    return 0


if __name__ == "__main__":
    sys.exit(main())
