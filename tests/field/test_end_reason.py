"""Why a tunnel ended, as a value (``end_reason``), and the owner's levers.

Programs count tunnels by how they ended (the router's metrics do); a value
saves them from reading error messages.  Also here: ``initiate_shutdown``
and ``wait_idle`` on a tunnel channel (a router retiring a replaced tunnel),
and a device's statistics of the tunnel that just ended.
"""

from __future__ import annotations

import asyncio

import grpclib.client
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    TEST_TIMEOUT,
    Blocking,
    Proxy,
    call_until_it_ends,
    options,
    serving,
)
from tests.reverse.support import KEY_HEADER, Device, connected, device_server, router, who

EndReason = tunnel.EndReason


async def ended(channel: tunnel.TunnelChannel) -> tunnel.EndReason | None:
    async with asyncio.timeout(5):
        await channel.wait_closed()
    return channel.end_reason


async def test_forward_end_reasons() -> None:
    handler = tunnel.TunnelServiceHandler([Blocking().service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            channel = await tunnel.open_tunnel(direct)
            assert channel.end_reason is None
            channel.close()
            assert await ended(channel) is EndReason.CLOSED

            channel = await tunnel.open_tunnel(direct)
            direct.close()
            assert await ended(channel) is EndReason.CONNECTION_LOST
        finally:
            direct.close()


async def test_peer_status_and_keepalive_end_reasons() -> None:
    opts = options(keepalive_interval=0.1, keepalive_timeout=0.3, close_timeout=0.3)
    handler = tunnel.TunnelServiceHandler([Blocking().service()], options=opts)
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            channel = await tunnel.open_tunnel(direct, options=opts)
            served.server.close()  # the network server ends the call with a status
            assert await ended(channel) is EndReason.PEER_STATUS
        finally:
            direct.close()
    handler = tunnel.TunnelServiceHandler([Blocking().service()], options=opts)
    async with serving([handler]) as served, Proxy(served.port) as proxy:
        direct = grpclib.client.Channel("127.0.0.1", proxy.port)
        try:
            channel = await tunnel.open_tunnel(direct, options=opts)
            proxy.freeze()
            assert await ended(channel) is EndReason.KEEPALIVE
        finally:
            direct.close()


async def test_reverse_end_reasons_and_the_devices_last_statistics() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), router() as net:
        async with (
            connected(net.port) as direct,
            device_server(direct, [Device("d")]) as running,
        ):
            serving = running.serve({KEY_HEADER: "d"})
            pool = net.handler.key_as_channel("d")
            await pool.wait_ready()
            assert await who(pool) == "d"
            (channel,) = net.handler.all_reverse_tunnels()
            running.server.close()  # the device ends the tunnel in order
            assert await ended(channel) is EndReason.PEER_CLOSED
            await serving
            stats = running.server.last_statistics
            assert stats is not None and stats.streams_opened == 1

        async with (
            connected(net.port) as direct,
            device_server(direct, [Device("d")]) as running,
        ):
            running.serve({KEY_HEADER: "d"})
            await pool.wait_ready()
            (channel,) = net.handler.all_reverse_tunnels()
            direct.close()  # the device's connection is gone
            assert await ended(channel) is EndReason.CONNECTION_LOST


async def test_initiate_shutdown_and_wait_idle() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                async with asyncio.timeout(1):
                    await channel.wait_idle()  # nothing in flight
                running = asyncio.create_task(call_until_it_ends(channel, "Unary"))
                await blocking.started.wait(1)
                channel.initiate_shutdown()
                refused = await call_until_it_ends(channel, "Unary")
                assert isinstance(refused, GRPCError) and refused.status is Status.UNAVAILABLE
                idle = asyncio.create_task(channel.wait_idle())
                await asyncio.sleep(0)
                assert not idle.done()  # the running call is still in flight
                running.cancel()
                await asyncio.gather(running, return_exceptions=True)
                async with asyncio.timeout(1):
                    await idle
        finally:
            direct.close()
