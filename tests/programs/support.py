"""Real processes for the programs' tests: a backend, routers, agents.

Each program runs as ``python -m ...`` in a process of its own, started
and stopped by PID.  The router and the agent log JSON on stderr; a thread
per stream collects the lines, and tests wait (bounded) for the line they
expect instead of sleeping.  Ports are chosen by the kernel (port 0) and
read back from the programs' first log line.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import ssl
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Coroutine, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpclib.client

from tests.stubs.pb import test_grpc, test_pb2

ROOT = Path(__file__).resolve().parents[2]
#: Upper bound for a process to start or to stop.
STARTUP = 20.0

Line = dict[str, Any]


class Process:
    """A program in a process of its own; its output lines, as they come."""

    def __init__(self, *args: str, name: str, env: dict[str, str] | None = None) -> None:
        self.name = name
        self.args = args
        environment = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        environment.pop("GRPCTUNNEL_TOKEN", None)
        environment.update(env or {})
        self.process = subprocess.Popen(
            [sys.executable, *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=environment,
            cwd=ROOT,
        )
        self.lines: list[Line] = []
        self._changed = threading.Condition()
        self._readers = [
            threading.Thread(target=self._read, args=(stream,), daemon=True)
            for stream in (self.process.stdout, self.process.stderr)
        ]
        for reader in self._readers:
            reader.start()

    @property
    def pid(self) -> int:
        return self.process.pid

    def _read(self, stream: Any) -> None:
        for raw in stream:
            raw = raw.rstrip("\n")
            try:
                line = json.loads(raw)
            except ValueError:
                line = None
            if not isinstance(line, dict):
                line = {"event": "text", "message": raw}
            with self._changed:
                self.lines.append(line)
                self._changed.notify_all()
        with self._changed:
            self._changed.notify_all()

    def text(self) -> str:
        """Everything the process printed, one line each (for assertion messages)."""
        with self._changed:
            return "\n".join(json.dumps(line) for line in self.lines)

    def wait_for(
        self, match: Callable[[Line], bool], timeout: float = STARTUP, *, after: int = 0
    ) -> Line:
        """The first line from index ``after`` on that matches (bounded wait)."""
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                for line in self.lines[after:]:
                    if match(line):
                        return line
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                if self.process.poll() is not None and not any(r.is_alive() for r in self._readers):
                    break
                self._changed.wait(min(left, 0.5))
        raise AssertionError(
            f"{self.name} (exit status {self.process.poll()}) never printed the line "
            f"expected; it printed:\n{self.text()}"
        )

    def wait_event(
        self, name: str, timeout: float = STARTUP, *, after: int = 0, **fields: Any
    ) -> Line:
        return self.wait_for(
            lambda line: (
                line.get("event") == name and all(line.get(k) == v for k, v in fields.items())
            ),
            timeout,
            after=after,
        )

    async def event(
        self, name: str, timeout: float = STARTUP, *, after: int = 0, **fields: Any
    ) -> Line:
        return await asyncio.to_thread(self.wait_event, name, timeout, after=after, **fields)

    def mark(self) -> int:
        """An index for ``after=``: only lines printed from now on."""
        with self._changed:
            return len(self.lines)

    @contextlib.contextmanager
    def stopped_on_failure(self) -> Iterator[None]:
        """Stop the process if starting it fails (no one else holds it yet)."""
        try:
            yield
        except BaseException:
            self.stop()
            raise

    def signal(self, signum: int) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signum)

    def wait(self, timeout: float = STARTUP) -> int:
        return self.process.wait(timeout=timeout)

    async def exited(self, timeout: float = STARTUP) -> int:
        return await asyncio.to_thread(self.wait, timeout)

    def stop(self) -> None:
        """SIGKILL if still running, wait, close the pipes."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.process.wait(timeout=STARTUP)
        for reader in self._readers:
            reader.join(timeout=STARTUP)
        for stream in (self.process.stdout, self.process.stderr):
            if stream is not None:
                stream.close()


T = TypeVar("T")


async def reaching_backend(
    backend: Backend, call: Coroutine[Any, Any, T], call_id: str
) -> asyncio.Task[T]:
    """Start ``call`` (it carries ``x-call-id: call_id``); return once the backend runs it."""
    mark = backend.mark()
    task = asyncio.ensure_future(call)
    try:
        await backend.event("call", after=mark, id=call_id)
    except BaseException:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
        raise
    return task


def grpctunnel(
    *args: str, stdin: str | None = None, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    """``python -m tunnel ARGS`` to its end: for usage errors and one-shot commands."""
    return subprocess.run(
        [sys.executable, "-m", "tunnel", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=30,
        input=stdin,
        env=env,
    )


def assert_usage_errors(cases: dict[tuple[str, ...], str], workers: int = 4) -> None:
    """Each argument list is refused as bad usage: exit status 2, one line naming what.

    ``cases`` maps the arguments to a text that line must contain; the
    commands run ``workers`` at a time (each is an interpreter start-up).
    """
    with ThreadPoolExecutor(workers) as pool:
        results = list(pool.map(lambda args: grpctunnel(*args), cases))
    for (args, expected), done in zip(cases.items(), results, strict=True):
        lines = done.stderr.strip().splitlines()
        assert done.returncode == 2, (args, done.stderr)
        assert len(lines) == 1 and expected in lines[0], (args, done.stderr)
        assert "Traceback" not in done.stderr


async def four_call_kinds(stub: test_grpc.TestServiceStub, metadata: dict[str, str]) -> None:
    """Unary, client-, server- and bidi-streaming calls through ``stub``, checked."""
    reply = await stub.Unary(test_pb2.Message(payload=b"hello"), metadata=metadata)
    assert reply.payload == b"hello"

    async with stub.ClientStream.open(metadata=metadata) as call:
        for i in range(3):
            await call.send_message(test_pb2.Message(payload=b"%d" % i))
        await call.end()
        summed = await call.recv_message()
    assert summed is not None and summed.count == 3 and summed.payload == b"2"

    async with stub.ServerStream.open(metadata=metadata) as call:
        await call.send_message(test_pb2.Message(payload=b"tick", count=4), end=True)
        replies = [r async for r in call]
    assert [r.payload for r in replies] == [b"tick"] * 4

    async with stub.BidiStream.open(metadata=metadata) as call:
        echoed = []
        for i in range(3):
            await call.send_message(test_pb2.Message(payload=b"ping %d" % i))
            echo = await call.recv_message()
            assert echo is not None
            echoed.append(echo.payload)
        await call.end()
        assert await call.recv_message() is None
    assert echoed == [b"ping 0", b"ping 1", b"ping 2"]


async def metadata_both_ways(
    stub: test_grpc.TestServiceStub, metadata: Mapping[str, str | bytes]
) -> dict[str, bytes]:
    """A call with text and binary headers, response headers and trailers, checked.

    The backend echoes the request headers it received: they are returned,
    for the caller to check what reached it (and what did not).
    """
    request = test_pb2.Message(
        payload=b"md",
        headers={"x-head-bin": "caf\u00e9".encode(), "x-head": b"text"},
        trailers={"x-trail-bin": b"\x01\x02", "x-trail": b"end"},
    )
    metadata = {**metadata, "x-data-bin": "\u00fcber".encode(), "x-text": "plain"}
    async with stub.Unary.open(metadata=metadata) as call:
        await call.send_message(request, end=True)
        reply = await call.recv_message()
        await call.recv_trailing_metadata()
    assert reply is not None
    assert reply.headers["x-data-bin"] == "\u00fcber".encode()
    assert reply.headers["x-text"] == b"plain"
    assert call.initial_metadata is not None and call.trailing_metadata is not None
    assert call.initial_metadata["x-head-bin"] == "caf\u00e9".encode()
    assert call.initial_metadata["x-head"] == "text"
    assert call.trailing_metadata["x-trail-bin"] == b"\x01\x02"
    assert call.trailing_metadata["x-trail"] == "end"
    return dict(reply.headers)


def port_of(address: str) -> int:
    return int(address.rpartition(":")[2])


class Backend(Process):
    """``python -m tunnel.testing.backend --events``."""

    def __init__(self) -> None:
        super().__init__(
            "-m", "tunnel.testing.backend", "--listen", "127.0.0.1:0", "--events", name="backend"
        )
        with self.stopped_on_failure():
            line = self.wait_for(lambda line: line.get("message", "").startswith("listening "))
        self.address = line["message"].split()[1]
        self.port = port_of(self.address)


#: Router flags for tests: quick keepalive, a short grace period.
FAST_ROUTER = ("--keepalive-interval", "2", "--keepalive-timeout", "2", "--grace-period", "5")
FAST_AGENT = (
    "--keepalive-interval",
    "2",
    "--keepalive-timeout",
    "2",
    "--min-backoff",
    "0.05",
    "--max-backoff",
    "0.3",
    "--grace-period",
    "5",
)


class Router(Process):
    """``python -m tunnel router`` with JSON logs, a gRPC and an admin port."""

    def __init__(
        self, *flags: str, listen: str = "127.0.0.1:0", env: dict[str, str] | None = None
    ) -> None:
        super().__init__(
            "-m",
            "tunnel",
            "router",
            "--listen",
            listen,
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
            *FAST_ROUTER,
            *flags,
            name="router",
            env=env,
        )
        with self.stopped_on_failure():
            line = self.wait_event("router_listening")
        self.address: str = line["grpc"]
        self.port = port_of(self.address)
        self.admin: str = line["admin"]


class Agent(Process):
    """``python -m tunnel agent`` with JSON logs and an admin port."""

    def __init__(
        self,
        router: Router | str | Sequence[Router | str],
        backend: Backend | str,
        key: str,
        *flags: str,
        env: dict[str, str] | None = None,
        wait: bool = True,
    ) -> None:
        routers = [router] if isinstance(router, Router | str) else router
        super().__init__(
            "-m",
            "tunnel",
            "agent",
            *(
                arg
                for r in routers
                for arg in ("--router", r.address if isinstance(r, Router) else r)
            ),
            "--backend",
            backend.address if isinstance(backend, Backend) else backend,
            "--key",
            key,
            "--admin",
            "127.0.0.1:0",
            "--log-format",
            "json",
            *FAST_AGENT,
            *flags,
            name=f"agent {key}",
            env=env,
        )
        with self.stopped_on_failure():
            started = self.wait_event("agent_started")
            self.admin: str = started["admin"]
            self.instance: str = started["instance"]
            if wait:
                # The agent may log "connected" a moment before the router
                # has put the tunnel in its pool: wait for the router's word.
                for r in routers:
                    if isinstance(r, Router):
                        r.wait_event("tunnel_opened", instance=self.instance)

    def wait_connected(self, timeout: float = STARTUP, after: int = 0) -> Line:
        return self.wait_for(
            lambda line: line.get("message", "").startswith("reverse tunnel connected"),
            timeout,
            after=after,
        )


def http_get(address: str, path: str) -> tuple[int, str]:
    """GET http://address/path: (status, body), also for 503."""
    try:
        with urllib.request.urlopen(f"http://{address}{path}", timeout=5) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


async def get(address: str, path: str) -> tuple[int, str]:
    return await asyncio.to_thread(http_get, address, path)


async def tunnels(admin: str) -> Any:
    status, body = await get(admin, "/tunnels")
    assert status == 200, body
    return json.loads(body)


async def metrics(admin: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """The admin port's /metrics, parsed by prometheus_client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families

    status, body = await get(admin, "/metrics")
    assert status == 200, body
    values = {}
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            values[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return values


@dataclass
class Stack:
    backend: Backend
    router: Router
    agent: Agent


P = TypeVar("P", bound=Process)


class Started(list[Process]):
    """The processes a test started; ``add`` returns what it adds."""

    def add(self, process: P) -> P:
        self.append(process)
        return process


@contextlib.contextmanager
def processes() -> Iterator[Started]:
    """A list to put processes in; every one is stopped (by PID) at the end."""
    started = Started()
    try:
        yield started
    finally:
        for process in reversed(started):
            process.stop()


class Callers:
    """grpclib channels to routers, opened by a test and closed after it."""

    def __init__(self) -> None:
        self.channels: list[grpclib.client.Channel] = []

    def stub(
        self, router: Router, ssl_context: ssl.SSLContext | None = None
    ) -> test_grpc.TestServiceStub:
        channel = grpclib.client.Channel("127.0.0.1", router.port, ssl=ssl_context)
        self.channels.append(channel)
        return test_grpc.TestServiceStub(channel)

    def close(self) -> None:
        for channel in self.channels:
            channel.close()
