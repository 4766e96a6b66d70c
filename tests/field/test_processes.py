"""Faults with real processes: a peer killed with SIGKILL, a server restarted.

The peers run ``tests/field/peer.py`` in processes of their own, started and
killed by PID.  A killed peer takes its connections with it, so every call
in flight must end with UNAVAILABLE at once; a restarted server must be
reached again by ``serve_forever`` and by ``ReconnectingTunnelChannel``
without anyone's help.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncGenerator, AsyncIterator
from pathlib import Path

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.reverse.support import key_from_metadata, router, who
from tunnel.testing._pb import grpchantesting

ROOT = Path(__file__).resolve().parents[2]
#: Upper bound for a process to start, and for a call to notice a dead peer.
STARTUP = 15.0
NOTICE = 3.0
TEST_TIMEOUT = 45.0


class Peer:
    """A ``tests.field.peer`` process; ``kill()`` sends SIGKILL."""

    def __init__(self, *args: str) -> None:
        env = dict(os.environ, PYTHONPATH=str(ROOT), PYTHONUNBUFFERED="1")
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tests.field.peer", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
            env=env,
            cwd=ROOT,
        )

    async def line(self, timeout: float = STARTUP) -> str:
        """The next line the peer prints (bounded)."""
        assert self.process.stdout is not None
        line = await asyncio.wait_for(asyncio.to_thread(self.process.stdout.readline), timeout)
        assert line, f"peer exited with {self.process.poll()}"
        return line.strip()

    def kill(self) -> None:
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=STARTUP)


@contextlib.asynccontextmanager
async def peer(*args: str) -> AsyncIterator[Peer]:
    process = Peer(*args)
    try:
        yield process
    finally:
        process.kill()
        assert process.process.stdout is not None
        process.process.stdout.close()


@contextlib.asynccontextmanager
async def network_server(port: int = 0) -> AsyncIterator[tuple[Peer, int]]:
    async with peer("server", "--port", str(port)) as server:
        line = await server.line()
        assert line.startswith("listening "), line
        yield server, int(line.split()[1])


async def test_forward_call_ends_when_the_server_is_killed() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), network_server() as (server, port):
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                assert await who(channel) == "server"
                call = await reached(channel)
                blocked = asyncio.ensure_future(anext(call))
                killed = time.monotonic()
                server.kill()
                with pytest.raises(GRPCError) as exc_info:
                    async with asyncio.timeout(NOTICE):
                        await blocked
                assert time.monotonic() - killed < NOTICE
                assert exc_info.value.status is Status.UNAVAILABLE
                assert channel.error is not None
        finally:
            direct.close()


async def test_reverse_call_ends_when_the_device_is_killed() -> None:
    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        peer("device", "--port", str(net.port), "--key", "kitchen") as device,
    ):
        assert await device.line() == "connected"
        pool = handler.key_as_channel("kitchen")
        async with asyncio.timeout(NOTICE):
            await pool.wait_ready()
        assert await who(pool) == "kitchen"
        call = await reached(pool)
        blocked = asyncio.ensure_future(anext(call))
        killed = time.monotonic()
        device.kill()
        with pytest.raises(GRPCError) as exc_info:
            async with asyncio.timeout(NOTICE):
                await blocked
        assert time.monotonic() - killed < NOTICE
        assert exc_info.value.status is Status.UNAVAILABLE
        assert "connection lost" in (exc_info.value.message or "")
        async with asyncio.timeout(NOTICE):
            while pool.is_ready():
                await asyncio.sleep(0.01)


async def test_device_comes_back_after_the_server_restarts() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with (
            network_server() as (server, port),
            peer("device", "--port", str(port), "--key", "kitchen") as device,
        ):
            assert await device.line() == "connected"
            server.kill()
            async with network_server(port) as (_again, same_port):
                assert same_port == port
                restarted = time.monotonic()
                assert await device.line() == "connected"
                assert time.monotonic() - restarted < NOTICE


async def test_reconnecting_channel_comes_back_after_the_server_restarts() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with network_server() as (server, port):
            direct = grpclib.client.Channel("127.0.0.1", port)
            try:
                async with tunnel.ReconnectingTunnelChannel(
                    direct, wait_for_ready=True, min_backoff=0.05, max_backoff=0.2
                ) as channel:
                    assert await who(channel) == "server"
                    server.kill()
                    async with network_server(port):
                        restarted = time.monotonic()
                        reply = await grpchantesting.TestServiceStub(channel).unary(
                            grpchantesting.Message(payload=b"who"), timeout=NOTICE
                        )
                        assert reply.payload == b"server"
                        assert time.monotonic() - restarted < NOTICE
                        assert channel.tunnels_opened == 2
            finally:
                direct.close()


async def reached(
    channel: grpclib.client.Channel,
) -> AsyncGenerator[grpchantesting.Message, None]:
    """A call that blocks in the peer's handler, once it is known to be there."""
    stream = grpchantesting.TestServiceStub(channel).server_stream(
        grpchantesting.Message(payload=b"block")
    )
    # betterproto's stub is an async generator (which a test may close) but
    # declares only AsyncIterator.
    assert isinstance(stream, AsyncGenerator)
    first = await anext(stream)
    assert first.payload
    return stream
