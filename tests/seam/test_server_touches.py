"""What ``tunnel._seam`` assumes of grpclib's server and task lookup, checked against grpclib.

``record_connections``/``drop_connections`` (what ``tunnel.trio.serve``
uses to stop a server as a process exit would) and
``follow_asyncio_current_task`` (grpclib under trio-asyncio).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from grpclib.exceptions import StreamTerminatedError
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest

from tunnel import _seam


async def test_recorded_connections_can_be_dropped() -> None:
    server = grpclib.server.Server([Health()])
    connections = _seam.record_connections(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    await server.start(sock=sock)
    channel = grpclib.client.Channel("127.0.0.1", sock.getsockname()[1])
    try:
        await HealthStub(channel).Check(HealthCheckRequest())
        assert len(connections) == 1
        server.close()
        _seam.drop_connections(connections)
        async with asyncio.timeout(10):
            await server.wait_closed()
            await connections.wait_closed()  # every recorded socket closed
            # Without the drop, grpclib's old connection would still answer
            # this call; with it, the channel must dial again and is refused.
            with pytest.raises((ConnectionRefusedError, StreamTerminatedError)):
                await HealthStub(channel).Check(HealthCheckRequest())
    finally:
        channel.close()


async def test_a_connection_made_after_the_drop_is_closed_once_made() -> None:
    """As a server stops, asyncio may still be making a connection it accepted.

    Dropped connections stay dropped: one made afterwards (here, the server
    was never closed, so it still accepts) is closed as soon as grpclib has
    it, and its call fails as on a lost connection instead of being served.
    """
    server = grpclib.server.Server([Health()])
    connections = _seam.record_connections(server)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    await server.start(sock=sock)
    _seam.drop_connections(connections)
    channel = grpclib.client.Channel("127.0.0.1", sock.getsockname()[1])
    try:
        async with asyncio.timeout(10):
            with pytest.raises((StreamTerminatedError, ConnectionError)):
                await HealthStub(channel).Check(HealthCheckRequest())
        assert len(connections) == 1
    finally:
        channel.close()
        server.close()
        async with asyncio.timeout(10):
            await server.wait_closed()


def test_grpclib_follows_asyncio_current_task() -> None:
    """After the call, grpclib's task lookup is asyncio's current one (patched or not)."""
    import grpclib.utils

    def bound_before_a_patch(
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> asyncio.Task[Any] | None:
        return None

    original = grpclib.utils._current_task
    try:
        grpclib.utils._current_task = bound_before_a_patch
        _seam.follow_asyncio_current_task()
        assert grpclib.utils._current_task is asyncio.current_task
    finally:
        grpclib.utils._current_task = original
