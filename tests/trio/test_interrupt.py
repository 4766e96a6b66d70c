"""Ctrl-C (SIGINT) ends a trio program using tunnels promptly and quietly.

Real processes: ``examples/trio_device.py --until-interrupted`` runs a
router, a device and a caller in one trio program; it is sent SIGINT at
several moments (while the device registers, while calls flow).  The
program catches ``KeyboardInterrupt`` as trio programs do (``except*``), so
anything on stderr came from inside the libraries.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent.parent
EXAMPLE = ROOT / "examples" / "trio_device.py"

#: Seconds a program gets to end after SIGINT (it takes well under one).
EXIT_BOUND = 15.0

#: What asyncio and trio-asyncio print when tasks or callbacks are abandoned.
ABANDONED = ("Task was destroyed", "Exception in callback", "never retrieved", "Unclosed")


#: Warnings as errors, as for every program the tests start, but for
#: ResourceWarning: a connection the kernel accepted as Ctrl-C arrived can be
#: left for the interpreter's exit to close, when trio-asyncio's loop stops
#: before asyncio has made its transport (``_seam.Connections`` closes every
#: connection asyncio made; this one it never made).  Python ignores
#: ResourceWarning by default, so users see nothing; with it as an error the
#: warning is printed from a destructor, about once in 40 runs.
CHILD_WARNINGS = "error,ignore::ResourceWarning"


def _interrupt(command: list[str], marker: str) -> subprocess.CompletedProcess[str]:
    """Start ``command``, send SIGINT once ``marker`` is printed, wait (bounded)."""
    env = {**os.environ, "PYTHONWARNINGS": CHILD_WARNINGS}
    process = subprocess.Popen(
        command, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
    )
    try:
        assert process.stdout is not None and process.stderr is not None
        seen = []
        for line in process.stdout:
            seen.append(line)
            if marker in line:
                break
        else:
            pytest.fail(f"{marker!r} never printed: {''.join(seen)}{process.stderr.read()}")
        process.send_signal(signal.SIGINT)
        out, err = process.communicate(timeout=EXIT_BOUND)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return subprocess.CompletedProcess(command, process.returncode, "".join(seen) + out, err)


@pytest.mark.parametrize("marker", ["registered", "running; Ctrl-C stops"])
def test_ctrl_c_ends_the_example_without_a_traceback(marker: str) -> None:
    done = _interrupt([sys.executable, str(EXAMPLE), "--until-interrupted"], marker)
    assert done.returncode == 130, done.stdout + done.stderr
    assert "stopped by Ctrl-C" in done.stdout
    assert done.stderr == ""


UNCAUGHT = textwrap.dedent(
    """
    import grpclib.client, trio
    import tunnel.trio
    from tests.stubs.pb import test_grpc, test_pb2
    from tests.trio.support import TrioTestService, asyncio_test_service

    async def main():
        async with tunnel.trio.open_loop(), trio.open_nursery() as nursery:
            handler = tunnel.trio.TunnelServiceHandler([TrioTestService("svc")])
            port = await nursery.start(tunnel.trio.serve, [handler])
            channel = grpclib.client.Channel("127.0.0.1", port)
            try:
                async with tunnel.trio.open_tunnel(channel) as tunneled:
                    stub = test_grpc.TestServiceStub(tunneled)
                    print("calling", flush=True)
                    while True:
                        await stub.Unary(test_pb2.Message(payload=b"x", delay_millis=1))
            finally:
                channel.close()

    trio.run(main)
    """
)


def test_uncaught_ctrl_c_shows_only_the_interrupt() -> None:
    """Without a handler, Python reports the KeyboardInterrupt, and nothing else.

    Its one traceback leads from the program's ``async with open_loop()`` to
    the line of ``tunnel/trio/_loop.py`` that raises it after the body ended;
    no other frame of the library, and nothing abandoned.
    """
    done = _interrupt([sys.executable, "-c", UNCAUGHT], "calling")
    assert done.returncode != 0
    assert done.stderr.rstrip().endswith("KeyboardInterrupt"), done.stderr
    assert done.stderr.count("Traceback (most recent call last)") == 1, done.stderr
    library_frames = [
        line for line in done.stderr.splitlines() if "/tunnel/" in line and "File" in line
    ]
    assert len(library_frames) == 1 and "tunnel/trio/_loop.py" in library_frames[0]
    assert not [word for word in ABANDONED if word in done.stderr], done.stderr
