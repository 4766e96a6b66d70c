"""Router replicas for the tests: a real redis-server, routers sharing it, a balancer.

``redis-server`` comes from the distribution (``.ci/run`` installs it); each
test starts its own on a free loopback port, without persistence, and stops
it by PID.  Routers join it with short TTLs so that expiry and refreshes
happen within a test's time.
"""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import threading
import time
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path
from typing import TypeVar

import redis.asyncio

from tests.programs.support import STARTUP, Line, Process, Router, port_of

#: Registry entries expire this long after their router's last refresh.
TTL = 1.5
#: The shared secret of the routers in these tests.
SECRET = "peer-secret-for-tests"


def redis_server_binary() -> str:
    found = shutil.which("redis-server")
    if found is None:
        raise RuntimeError(
            "these tests need redis-server: apt-get install redis-server (.ci/run installs it)"
        )
    return found


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class RedisServer:
    """``redis-server`` on 127.0.0.1, no persistence, in the foreground; stopped by PID."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.process = subprocess.Popen(
            [
                *(redis_server_binary(), "--port", str(self.port), "--bind", "127.0.0.1"),
                *("--save", "", "--appendonly", "no", "--daemonize", "no"),
                *("--loglevel", "warning"),
            ],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.output: list[str] = []
        reader = threading.Thread(target=self._read, daemon=True)
        reader.start()
        self._reader = reader
        try:
            self._wait_ready()
        except BaseException:
            self.stop()
            raise

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line.rstrip("\n"))

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + STARTUP
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                break
            with (
                contextlib.suppress(OSError),
                socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock,
            ):
                sock.sendall(b"PING\r\n")
                if sock.recv(64).startswith(b"+PONG"):
                    return
            time.sleep(0.02)
        raise AssertionError(
            f"redis-server on port {self.port} did not start:\n" + "\n".join(self.output)
        )

    @property
    def pid(self) -> int:
        return self.process.pid

    def stop(self) -> None:
        """SIGKILL (no persistence: nothing to save), wait, close the pipe."""
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STARTUP)
        self._reader.join(timeout=STARTUP)
        if self.process.stdout is not None:
            self.process.stdout.close()

    @contextlib.asynccontextmanager
    async def client(self) -> AsyncIterator[redis.asyncio.Redis]:
        client = redis.asyncio.Redis(port=self.port, decode_responses=True)
        try:
            yield client
        finally:
            await client.aclose()


class Balancer(Process):
    """``python -m tests.programs.balancer``: round-robin TCP over the routers' ports."""

    def __init__(self, *routers: Router) -> None:
        super().__init__(
            "-m", "tests.programs.balancer", *(r.address for r in routers), name="balancer"
        )
        with self.stopped_on_failure():
            line = self.wait_for(lambda line: line.get("message", "").startswith("listening "))
        self.address: str = line["message"].split()[1]
        self.port = port_of(self.address)


def secret_file(directory: Path) -> Path:
    file = directory / "peer.secret"
    if not file.exists():
        file.write_text(SECRET + "\n")
    return file


class Replica(Router):
    """A router that shares ``redis``'s registry, with a peer listener on a free port."""

    def __init__(
        self,
        redis_server: RedisServer,
        router_id: str,
        secret: Path,
        *flags: str,
        listen: str = "127.0.0.1:0",
        ttl: float = TTL,
    ) -> None:
        super().__init__(
            "--registry", redis_server.url, "--router-id", router_id,
            "--peer-listen", "127.0.0.1:0", "--peer-secret-file", str(secret),
            "--registry-ttl", str(ttl), *flags,
            listen=listen,
        )  # fmt: skip
        self.name = f"router {router_id}"
        self.router_id = router_id
        listening = self.wait_event("router_listening")
        self.peer: str = listening["peer"]
        self.advertise: str = listening["advertise"]


P = TypeVar("P", bound=Process)


def printed_by(
    processes: Sequence[P],
    match: Callable[[Line], bool],
    timeout: float = STARTUP,
    *,
    after: Sequence[int] = (),
) -> P:
    """The first of ``processes`` that printed a matching line (bounded wait).

    ``after`` gives each process's ``mark()``: only lines printed since count.
    """
    deadline = time.monotonic() + timeout
    while True:
        for i, process in enumerate(processes):
            start = after[i] if after else 0
            if any(match(line) for line in list(process.lines)[start:]):
                return process
        if time.monotonic() > deadline:
            names = ", ".join(p.name for p in processes)
            raise AssertionError(f"none of {names} printed the line expected")
        time.sleep(0.01)  # scanning logs that each process's reader thread fills


def opened_on(routers: list[Replica], instance: str, timeout: float = STARTUP) -> Replica:
    """The router on which agent ``instance``'s tunnel opened (bounded wait)."""
    return printed_by(
        routers,
        lambda line: line.get("event") == "tunnel_opened" and line.get("instance") == instance,
        timeout,
    )
