"""Opening a tunnel is bounded, and a failed or abandoned opening leaves nothing open.

``negotiation_timeout`` bounds the whole opening: the connection, the
carrying call's response headers and the tunnel server's ``Settings``.  A
peer that accepts TCP and never answers, or answers the call and never
sends ``Settings``, costs the opener that long and no more; the carrying
call is reset, so the other end learns of it too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from grpclib.const import Cardinality, Handler

import tunnel
from tests.integration.support import TEST_TIMEOUT, options, serving
from tunnel._pb.tunnel_pb2 import ClientToServer, ServerToClient

#: The opening budget of these tests, and how much later than it a failure may come.
BUDGET = 0.5
SLACK = 2.0


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[int]:
    """A TCP server on 127.0.0.1 that accepts, reads everything and never answers."""
    readers: set[asyncio.Task[Any]] = set()

    async def swallow(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        readers.add(task)
        try:
            while await reader.read(65536):
                pass
        finally:
            writer.transport.abort()
            readers.discard(task)

    server = await asyncio.start_server(swallow, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        for task in list(readers):
            task.cancel()
        async with asyncio.timeout(5):
            await asyncio.gather(*readers, return_exceptions=True)
            await server.wait_closed()


class MuteTunnelService:
    """Answers ``OpenTunnel`` with headers, then never sends a frame.

    ``ended`` is set once the handler is cancelled: the client reset the call.
    """

    def __init__(self) -> None:
        self.opened = asyncio.Event()
        self.ended = asyncio.Event()

    async def open_tunnel(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.send_initial_metadata(metadata={"grpctunnel-negotiate": "on"})
        self.opened.set()
        try:
            await asyncio.Event().wait()
        finally:
            self.ended.set()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/grpctunnel.v1.TunnelService/OpenTunnel": Handler(
                self.open_tunnel, Cardinality.STREAM_STREAM, ClientToServer, ServerToClient
            )
        }


async def test_open_tunnel_to_a_silent_server_times_out() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), silent_server() as port:
        channel = grpclib.client.Channel("127.0.0.1", port)
        try:
            started = time.monotonic()
            with pytest.raises(tunnel.OpenTimeoutError) as exc_info:
                await tunnel.open_tunnel(channel, options=options(negotiation_timeout=BUDGET))
            assert time.monotonic() - started < BUDGET + SLACK
            error = exc_info.value
            assert isinstance(error, TimeoutError) and isinstance(error, tunnel.TunnelError)
            assert "within 0.5 s" in str(error), error
        finally:
            channel.close()


async def test_reverse_serve_to_a_silent_server_times_out() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), silent_server() as port:
        channel = grpclib.client.Channel("127.0.0.1", port)
        try:
            device = tunnel.ReverseTunnelServer(
                channel, [], options=options(negotiation_timeout=BUDGET)
            )
            started = time.monotonic()
            with pytest.raises(tunnel.OpenTimeoutError):
                await device.serve()
            assert time.monotonic() - started < BUDGET + SLACK
        finally:
            channel.close()


async def test_serve_forever_keeps_trying_a_silent_server(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.WARNING, logger="tunnel")
    async with asyncio.timeout(TEST_TIMEOUT), silent_server() as port:
        channel = grpclib.client.Channel("127.0.0.1", port)
        try:
            device = tunnel.ReverseTunnelServer(
                channel, [], options=options(negotiation_timeout=0.2)
            )
            forever = asyncio.create_task(device.serve_forever(min_backoff=0.05, max_backoff=0.1))
            while sum("OpenTimeoutError" in r.getMessage() for r in caplog.records) < 2:
                assert not forever.done()
                await asyncio.sleep(0.05)
            device.close()
            async with asyncio.timeout(SLACK):
                await forever
        finally:
            channel.close()


async def test_no_settings_resets_the_carrying_call() -> None:
    mute = MuteTunnelService()
    async with asyncio.timeout(TEST_TIMEOUT), serving([mute]) as served:
        channel = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            with pytest.raises(tunnel.OpenTimeoutError, match="no settings"):
                await tunnel.open_tunnel(channel, options=options(negotiation_timeout=BUDGET))
            async with asyncio.timeout(SLACK):
                await mute.ended.wait()
        finally:
            channel.close()


async def test_cancelled_opening_resets_the_carrying_call() -> None:
    mute = MuteTunnelService()
    async with asyncio.timeout(TEST_TIMEOUT), serving([mute]) as served:
        channel = grpclib.client.Channel("127.0.0.1", served.port)
        try:

            async def open_() -> tunnel.TunnelChannel:
                return await tunnel.open_tunnel(channel)

            opening = asyncio.create_task(open_())
            async with asyncio.timeout(SLACK):
                await mute.opened.wait()
            opening.cancel()
            with pytest.raises(asyncio.CancelledError):
                await opening
            async with asyncio.timeout(SLACK):
                await mute.ended.wait()
        finally:
            channel.close()
