"""One 200 MiB frame costs each end of a tunnel a few MiB, not 200 MiB.

Each end runs in a child process (``frame_memory_child.py``) that reports
its resident memory before the attack and its peak during it; the test's
process plays the hostile peer, writing one frame's 5-byte gRPC prefix and
200 MiB of data by hand.  The end must refuse the frame from its prefix
(RESOURCE_EXHAUSTED, the tunnel ends) and its peak may grow by no more
than the frame bound plus a few MiB (the HTTP/2 window of unread data,
buffers, allocator slack).

``python -m tests.integration.test_frame_memory [CHECKOUT]`` prints the
figures of every end, for this checkout or another one (its ``tunnel``
package is put first on the child's path).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grpclib.server
import pytest

from tests.integration.hostile import (
    OPEN_REVERSE_TUNNEL,
    OPEN_TUNNEL,
    MiB,
    RawTunnelServer,
    call_status,
    write_big_frame,
    write_frame,
)
from tests.integration.support import connected, serving
from tunnel._pb.tunnel_pb2 import REVISION_ONE, REVISION_ZERO, ServerToClient, Settings
from tunnel.options import TunnelOptions

CHILD = Path(__file__).with_name("frame_memory_child.py")
ROOT = Path(__file__).resolve().parents[2]

#: The hostile frame's size.
FRAME = 200 * MiB
#: What a refused frame may cost an end beyond the bound: grpclib's 4 MiB
#: HTTP/2 stream window of data received but never read, plus buffers.
SLACK = 8 * MiB
#: The whole measurement of one end, child process included (seconds).
BOUND = 60.0

pytestmark = pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak RSS"
)


@dataclass
class Figures:
    end: str
    before_kib: int
    peak_kib: int
    outcome: str

    @property
    def growth(self) -> int:
        return (self.peak_kib - self.before_kib) * 1024


class Child:
    """The tunnel end under attack, in a process of its own."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc

    @classmethod
    async def start(cls, role: str, port: int | None, checkout: Path | None) -> Child:
        env = dict(os.environ)
        if checkout is not None:
            env["PYTHONPATH"] = str(checkout)
        args = [str(CHILD), role] + ([] if port is None else [str(port)])
        proc = await asyncio.create_subprocess_exec(
            sys.executable,
            *args,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            env=env,
            cwd=ROOT,
        )
        return cls(proc)

    async def report(self) -> dict[str, Any]:
        assert self.proc.stdout is not None
        line = await self.proc.stdout.readline()
        assert line, "the child ended without reporting"
        result: dict[str, Any] = json.loads(line)
        return result

    def tell(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"done\n")

    async def close(self) -> None:
        if self.proc.returncode is None:
            try:
                async with asyncio.timeout(10):
                    await self.proc.wait()
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()


async def attack_server(method: str, checkout: Path | None) -> Figures:
    """The child serves; we open a tunnel and write one huge frame."""
    child = await Child.start("server", None, checkout)
    try:
        first = await child.report()
        async with connected(first["port"]) as channel:
            status = await call_status(
                channel, method, lambda stream: write_big_frame(stream, FRAME)
            )
        child.tell()
        last = await child.report()
    finally:
        await child.close()
    outcome = "no status" if status is None else f"{status.status.name}: {status.message}"
    end = "forward tunnel server" if method == OPEN_TUNNEL else "reverse tunnel network server"
    return Figures(end, first["rss_kib"], last["hwm_kib"], outcome)


async def attack_client(role: str, checkout: Path | None) -> Figures:
    """We serve; the child opens a tunnel to us and gets one huge frame."""

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        if role == "forward-client":
            settings = Settings(
                supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE],
                initial_window_size=65_536,
            )
            await write_frame(stream, ServerToClient(stream_id=-1, settings=settings))
        await write_big_frame(stream, FRAME)

    async with serving([RawTunnelServer(behave)]) as served:
        child = await Child.start(role, served.port, checkout)
        try:
            first = await child.report()
            last = await child.report()
        finally:
            await child.close()
    end = "forward tunnel network client" if role == "forward-client" else "reverse tunnel device"
    return Figures(end, first["rss_kib"], last["hwm_kib"], last["outcome"])


#: The attack on each end, given the checkout to import ``tunnel`` from.
ATTACKS: dict[str, Callable[[Path | None], Awaitable[Figures]]] = {
    "forward-server": lambda checkout: attack_server(OPEN_TUNNEL, checkout),
    "reverse-server": lambda checkout: attack_server(OPEN_REVERSE_TUNNEL, checkout),
    "forward-client": lambda checkout: attack_client("forward-client", checkout),
    "device": lambda checkout: attack_client("device", checkout),
}


@pytest.mark.parametrize("end", list(ATTACKS))
async def test_one_huge_frame_costs_a_few_mib(end: str) -> None:
    async with asyncio.timeout(BOUND):
        figures = await ATTACKS[end](None)
    # A server answers with the carrying call's status; a client's tunnel
    # ends with the error itself.
    assert "RESOURCE_EXHAUSTED" in figures.outcome or "FrameTooLarge" in figures.outcome
    assert "frame larger than max" in figures.outcome, figures.outcome
    bound = TunnelOptions().max_frame_size
    assert figures.growth < bound + SLACK, (
        f"{figures.end}: peak grew by {figures.growth / MiB:.1f} MiB "
        f"(bound {bound / MiB:.0f} MiB + slack {SLACK / MiB:.0f} MiB)"
    )


async def _main(checkout: Path | None) -> None:
    for attack in ATTACKS.values():
        async with asyncio.timeout(300):
            f = await attack(checkout)
        print(
            f"{f.end:32} before {f.before_kib / 1024:6.1f} MiB  peak {f.peak_kib / 1024:6.1f} MiB"
            f"  growth {f.growth / MiB:6.1f} MiB  {f.outcome[:90]}"
        )


if __name__ == "__main__":
    asyncio.run(_main(Path(sys.argv[1]).resolve() if len(sys.argv) > 1 else None))
