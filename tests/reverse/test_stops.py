"""Neither end hangs when the other stops answering or its server stops."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpclib.server
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel

from .support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Device,
    connected,
    device_server,
    listening_socket,
    registered,
    router,
)


async def test_network_server_close_ends_serve_with_unavailable() -> None:
    """grpclib's ``Server.close()`` cancels handlers, sends nothing, keeps connections.

    The device must not wait forever on a tunnel nobody serves.
    """
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, [service]) as running,
    ):
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(net.handler, "dev", serving)
        # Only close(): its wait_closed() would wait for the device's
        # connection on Python >= 3.12.1, and that connection is the point.
        net.server.close()
        async with asyncio.timeout(PROMPT):
            with pytest.raises(GRPCError) as failed:
                await serving
        assert failed.value.status is Status.UNAVAILABLE
        assert net.handler.all_reverse_tunnels() == []


@contextlib.asynccontextmanager
async def silent_server() -> AsyncIterator[tuple[int, asyncio.Event]]:
    """A TCP server that accepts connections and never answers a byte.

    Yields its port and an event set once a connection came in.
    """
    writers: list[asyncio.StreamWriter] = []
    accepted = asyncio.Event()

    async def accept(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writers.append(writer)
        accepted.set()

    sock = listening_socket()
    server = await asyncio.start_server(accept, sock=sock)
    try:
        yield sock.getsockname()[1], accepted
    finally:
        server.close()
        for writer in writers:
            writer.close()
        await server.wait_closed()


async def test_close_ends_serve_while_the_network_server_does_not_answer() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        silent_server() as (port, accepted),
        connected(port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        serving = running.serve()
        forever = asyncio.create_task(running.server.serve_forever())
        running.tasks.append(forever)
        async with asyncio.timeout(PROMPT):
            await accepted.wait()  # both are opening their call now, and get no answer
        assert not serving.done() and not forever.done()
        running.server.close()
        async with asyncio.timeout(PROMPT):
            await asyncio.gather(serving, forever)
            await running.server.wait_closed()


async def test_close_ends_serve_when_the_network_server_keeps_the_call_open() -> None:
    """After ``close()`` the device waits at most ``close_timeout`` for the call's end."""
    gate = asyncio.Event()

    class Stubborn(tunnel.TunnelServiceHandler):
        async def _open_reverse_tunnel(self, stream: grpclib.server.Stream[Any, Any]) -> None:
            try:
                await super()._open_reverse_tunnel(stream)
            finally:
                await gate.wait()  # the call stays open after the tunnel ended

    handler = Stubborn(affinity_key=lambda c: c.metadata.get(KEY_HEADER))
    options = tunnel.TunnelOptions(close_timeout=0.2)
    try:
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            router(handler) as net,
            connected(net.port) as channel,
            device_server(channel, [Device("dev")], options=options) as running,
        ):
            serving = running.serve({KEY_HEADER: "dev"})
            await registered(handler, "dev", serving)
            running.server.close()
            async with asyncio.timeout(PROMPT):
                await serving
    finally:
        gate.set()
