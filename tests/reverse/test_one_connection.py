"""Many devices on one connection: bounded, and the failure says why.

Each open tunnel holds one HTTP/2 stream of its connection, and servers
allow 100 at once (h2's default, which grpclib keeps).  The tunnel that
finds no stream free must not wait silently forever: its opening times out
after ``negotiation_timeout`` and says that the connection is at its limit.
"""

from __future__ import annotations

import asyncio

import pytest

import tunnel

from .support import (
    KEY_HEADER,
    TEST_TIMEOUT,
    Device,
    connected,
    device_server,
    key_from_metadata,
    router,
)

LIMIT = 100


async def test_the_tunnel_beyond_the_connections_stream_limit_says_why() -> None:
    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
    # The hundred that fit open with time to spare, however busy the machine;
    # the one that does not fit gives up after half a second.
    opts = tunnel.TunnelOptions(negotiation_timeout=0.5)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("d")]) as running,
        device_server(channel, [Device("d")], options=opts) as one_more,
    ):
        for i in range(LIMIT):
            running.serve({KEY_HEADER: str(i)})
        await asyncio.gather(*(handler.key_as_channel(str(i)).wait_ready() for i in range(LIMIT)))
        assert len(handler.all_reverse_tunnels()) == LIMIT
        with pytest.raises(tunnel.OpenTimeoutError) as exc_info:
            await one_more.server.serve({KEY_HEADER: "one too many"})
        message = str(exc_info.value)
        assert "limit of 100 concurrent HTTP/2 streams" in message, message
        assert "one connection per 100 tunnels" in message
        # A device on a connection of its own is served.
        async with (
            connected(net.port) as other,
            device_server(other, [Device("e")], options=opts) as second,
        ):
            second.serve({KEY_HEADER: "own connection"})
            await handler.key_as_channel("own connection").wait_ready()
