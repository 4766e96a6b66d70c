"""Running the interop programs as subprocesses, the way a user (or CI) would.

Every program is started with the test's own Python, on a port the test got
by binding port 0 and releasing it. Servers run until the test stops them;
their stderr goes to a file so the test can wait for ``Listening on`` and
read the log afterwards.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

#: Seconds of load per run: short, so the suite stays fast (the reference: 5).
DURATION = "0.5"
#: Upper bound for one client run, startup and both parts included.
CLIENT_TIMEOUT = 30.0
#: Upper bound for a server to start listening or to stop.
SERVER_TIMEOUT = 10.0

#: Go's log prefix: ``2009/11/10 23:00:00 ``.
LOG_PREFIX = r"\d{4}/\d{2}/\d{2} \d{2}:\d{2}:\d{2} "

ROOT = Path(__file__).resolve().parents[2]


def free_port() -> int:
    """A port that was free a moment ago (bound to 0, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def log_lines(text: str) -> list[str]:
    """The messages of a Go-style log, each checked for the date/time prefix."""
    lines = []
    for line in text.splitlines():
        match = re.match(LOG_PREFIX, line)
        assert match, f"log line without a date/time prefix: {line!r}"
        lines.append(line[match.end() :])
    return lines


def count_of(pattern: str, lines: Sequence[str]) -> int:
    """The number in the one log line matching *pattern* (with one ``(\\d+)``)."""
    found = [int(m.group(1)) for line in lines if (m := re.fullmatch(pattern, line))]
    assert len(found) == 1, f"expected one line matching {pattern!r} in {lines!r}"
    return found[0]


@dataclass
class Run:
    returncode: int
    stdout: str
    stderr: str

    @property
    def lines(self) -> list[str]:
        return log_lines(self.stderr)


def run_program(args: Sequence[str], *, timeout: float = CLIENT_TIMEOUT) -> Run:
    """Run ``python <args>`` to the end; return its status and output."""
    done = subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=_env(),
        cwd=ROOT,
    )
    return Run(done.returncode, done.stdout, done.stderr)


@dataclass
class ServerProcess:
    process: subprocess.Popen[bytes]
    port: int
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text()


@contextlib.contextmanager
def running_server(args: Sequence[str], port: int, *, ready: str | None) -> Iterator[ServerProcess]:
    """Start ``python <args>``; wait until its log has the line *ready*; stop it at the end.

    The server is stopped with SIGTERM, then SIGKILL if it does not exit in
    time; only the process this function started is signalled.
    """
    with tempfile.TemporaryDirectory() as tmp:
        log_path = Path(tmp) / "server.log"
        with log_path.open("wb") as log_file:
            process = subprocess.Popen(
                [sys.executable, *args],
                stdout=log_file,
                stderr=subprocess.STDOUT,
                env=_env(),
                cwd=ROOT,
            )
        server = ServerProcess(process, port, log_path)
        try:
            if ready is not None:
                deadline = time.monotonic() + SERVER_TIMEOUT
                while ready not in server.log():
                    if process.poll() is not None:
                        raise AssertionError(f"server exited early:\n{server.log()}")
                    if time.monotonic() > deadline:
                        raise AssertionError(f"server not ready:\n{server.log()}")
                    time.sleep(0.02)
            yield server
        finally:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(SERVER_TIMEOUT)
                except subprocess.TimeoutExpired:
                    process.kill()
                    process.wait()
