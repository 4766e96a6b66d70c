"""Neither end hangs when the other stops answering or its server stops."""

from __future__ import annotations

import asyncio

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from .support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Device,
    connected,
    device_server,
    registered,
    router,
    stop,
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
        await stop(net.server)
        async with asyncio.timeout(PROMPT):
            with pytest.raises(GRPCError) as failed:
                await serving
        assert failed.value.status is Status.UNAVAILABLE
        assert net.handler.all_reverse_tunnels() == []
