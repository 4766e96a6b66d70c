"""``ReconnectingTunnelChannel``: a forward channel that stays usable across drops.

The network server restarts; the channel opens a new tunnel by itself,
tells the application (a counter and a callback: affinity to the old
backend is lost), and calls go on.  While there is no tunnel, a call fails
fast with UNAVAILABLE, or waits for one until its deadline with
``wait_for_ready``.  Permanent refusals stop it; ``close()`` ends it at once.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import Blocking, call_until_it_ends
from tests.reverse.support import PROMPT, TEST_TIMEOUT, Backoff, Device, Router, router, who

BACKOFF: Backoff = {"min_backoff": 0.02, "max_backoff": 0.1, "jitter": 0.2}


@asynccontextmanager
async def backend(port: int = 0, name: str = "backend") -> AsyncIterator[Router]:
    """A network server whose forward tunnels reach a ``Device`` named *name*."""
    handler = tunnel.TunnelServiceHandler([Device(name)])
    async with router(handler, port=port) as r:
        yield r


async def test_reopens_after_the_server_restarts(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    opened: list[tunnel.TunnelChannel] = []

    async def on_tunnel_open(channel: tunnel.TunnelChannel) -> None:
        await asyncio.sleep(0)
        opened.append(channel)

    async with asyncio.timeout(TEST_TIMEOUT), backend(name="first") as first:
        port = first.port
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.ReconnectingTunnelChannel(
                direct, on_tunnel_open=on_tunnel_open, **BACKOFF
            ) as channel:
                assert await who(channel) == "first"
                assert channel.tunnels_opened == 1 and len(opened) == 1

                await first.crash()
                # No tunnel and nobody listening: calls fail fast.
                with pytest.raises(GRPCError) as exc_info:
                    async with asyncio.timeout(PROMPT):
                        while True:
                            await who(channel)
                assert exc_info.value.status is Status.UNAVAILABLE

                async with backend(port, name="second"):
                    restarted = time.monotonic()
                    async with asyncio.timeout(PROMPT):
                        await channel.wait_ready()
                    assert await who(channel) == "second"
                    assert time.monotonic() - restarted < PROMPT
                    assert channel.tunnels_opened == 2 and len(opened) == 2
                    assert opened[0] is not opened[1]
        finally:
            direct.close()
    messages = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("forward tunnel lost (") for m in messages), messages
    assert any(m.startswith("forward tunnel 2 open after") for m in messages), messages


async def test_wait_for_ready_waits_for_the_server() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with backend() as gone:
            port = gone.port
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.ReconnectingTunnelChannel(
                direct, wait_for_ready=True, **BACKOFF
            ) as channel:
                # Nobody listens: a call with a deadline waits, then times out.
                with pytest.raises(asyncio.TimeoutError):
                    await grpclib_unary(channel, timeout=0.3)
                call = asyncio.create_task(grpclib_unary(channel, timeout=PROMPT * 2))
                async with backend(port):
                    async with asyncio.timeout(PROMPT * 2):
                        assert await call == "backend"
        finally:
            direct.close()


async def grpclib_unary(channel: grpclib.client.Channel, *, timeout: float) -> str:
    from tunnel.testing._pb import grpchantesting

    reply = await grpchantesting.TestServiceStub(channel).unary(
        grpchantesting.Message(payload=b"who"), timeout=timeout
    )
    return reply.payload.decode()


async def test_permanent_refusal_stops_it() -> None:
    handler = tunnel.TunnelServiceHandler()  # no forward services: UNIMPLEMENTED
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as net:
        direct = grpclib.client.Channel("127.0.0.1", net.port)
        try:
            async with tunnel.ReconnectingTunnelChannel(direct, **BACKOFF) as channel:
                with pytest.raises(GRPCError) as exc_info:
                    async with asyncio.timeout(PROMPT):
                        await channel.wait_ready()
                assert exc_info.value.status is Status.UNIMPLEMENTED
                assert isinstance(channel.error, GRPCError)
                with pytest.raises(GRPCError) as call_error:
                    async with asyncio.timeout(PROMPT):
                        await who(channel)
                assert call_error.value.status is Status.UNIMPLEMENTED
                assert channel.tunnels_opened == 0
        finally:
            direct.close()


async def test_close_ends_everything_at_once() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as net:
        direct = grpclib.client.Channel("127.0.0.1", net.port)
        try:
            channel = tunnel.ReconnectingTunnelChannel(direct, **BACKOFF)
            in_flight = asyncio.create_task(call_until_it_ends(channel, "Unary"))
            await blocking.started.wait(1)
            channel.close()
            async with asyncio.timeout(PROMPT):
                outcome = await in_flight
                await channel.wait_closed()
            assert isinstance(outcome, GRPCError) and outcome.status is Status.CANCELLED
            assert channel.closed
            after = await call_until_it_ends(channel, "Unary")
            assert isinstance(after, GRPCError) and after.status is Status.UNAVAILABLE
        finally:
            direct.close()


async def test_close_releases_calls_waiting_for_a_tunnel() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with backend() as gone:
            port = gone.port
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            channel = tunnel.ReconnectingTunnelChannel(direct, wait_for_ready=True, **BACKOFF)
            waiting = asyncio.create_task(call_until_it_ends(channel, "Unary"))
            async with asyncio.timeout(PROMPT):
                while channel.error is None:  # an attempt failed: the call waits
                    await asyncio.sleep(0.01)
            assert not waiting.done()
            channel.close()
            async with asyncio.timeout(PROMPT):
                outcome = await waiting
                await channel.wait_closed()
            assert isinstance(outcome, GRPCError) and outcome.status is Status.UNAVAILABLE
        finally:
            direct.close()


async def test_nothing_happens_before_first_use() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), backend() as net:
        direct = grpclib.client.Channel("127.0.0.1", net.port)
        try:
            channel = tunnel.ReconnectingTunnelChannel(direct)
            assert channel.tunnel is None and channel.tunnels_opened == 0
            assert len(net.connections) == 0
            assert await who(channel) == "backend"  # the first call opens it
            assert channel.tunnels_opened == 1
            await channel.aclose()
        finally:
            direct.close()
