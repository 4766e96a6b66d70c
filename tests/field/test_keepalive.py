"""A peer that goes silent behind a live connection is noticed, by both ends.

A loopback proxy that stops forwarding without closing anything stands in
for a NAT that dropped its mapping, a frozen VM or a black-holing middlebox.
Each end of a tunnel, in each role, must notice within
``keepalive_interval + keepalive_timeout``: every call fails with
UNAVAILABLE, ``error`` says keepalive, a device's ``serve()`` returns so
that ``serve_forever`` reconnects.  An idle tunnel with a live peer is
never torn down.
"""

from __future__ import annotations

import asyncio
import time

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    FLOW_CONTROL,
    TEST_TIMEOUT,
    Blocking,
    Proxy,
    call_until_it_ends,
    fc_id,
    options,
    serving,
)
from tests.reverse.support import KEY_HEADER, Device, device_server, key_from_metadata, router, who
from tunnel.testing._pb import grpchantesting
from tunnel.testing._pb.grpchantesting import Message

INTERVAL = 0.3
TIMEOUT = 0.5
#: Noticed within interval + timeout; the rest is scheduling on a busy machine.
NOTICED = INTERVAL + TIMEOUT + 2.0

OFF = None


def keepalive(
    interval: float | None = INTERVAL, *, disable_fc: bool = False
) -> tunnel.TunnelOptions:
    return options(
        disable_flow_control=disable_fc,
        keepalive_interval=interval,
        keepalive_timeout=TIMEOUT,
        close_timeout=TIMEOUT,  # a close() over the frozen proxy waits this long
    )


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
@pytest.mark.parametrize("client_keepalive", [INTERVAL, OFF], ids=["both", "server-only"])
async def test_forward_silent_peer_is_noticed(
    disable_fc: bool, client_keepalive: float | None
) -> None:
    blocking = Blocking()
    server_opts = keepalive(disable_fc=disable_fc)
    handler = tunnel.TunnelServiceHandler([blocking.service()], options=server_opts)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler]) as served,
        Proxy(served.port) as proxy,
    ):
        direct = grpclib.client.Channel("127.0.0.1", proxy.port)
        try:
            channel = await tunnel.open_tunnel(
                direct, options=keepalive(client_keepalive, disable_fc=disable_fc)
            )
            call = asyncio.create_task(call_until_it_ends(channel, "BidiStream"))
            await blocking.started.wait(1)

            proxy.freeze()
            frozen_at = time.monotonic()
            # The network server (tunnel server) notices: its handler is cancelled.
            async with asyncio.timeout(NOTICED):
                await blocking.cancelled.wait(1)
            if client_keepalive is not None:
                # So does the network client (tunnel client): the call fails.
                async with asyncio.timeout(NOTICED):
                    outcome = await call
                assert time.monotonic() - frozen_at < NOTICED
                assert isinstance(outcome, GRPCError), outcome
                assert outcome.status is Status.UNAVAILABLE
                assert "keepalive" in (outcome.message or ""), outcome
                assert isinstance(channel.error, tunnel.KeepaliveTimeoutError)
            channel.close()
            async with asyncio.timeout(NOTICED):
                await call
                await channel.wait_closed()
        finally:
            direct.close()


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
@pytest.mark.parametrize("router_keepalive", [INTERVAL, OFF], ids=["both", "device-only"])
async def test_reverse_silent_peer_is_noticed(
    disable_fc: bool, router_keepalive: float | None
) -> None:
    device = Device("kitchen")
    handler = tunnel.TunnelServiceHandler(
        affinity_key=key_from_metadata,
        options=keepalive(router_keepalive, disable_fc=disable_fc),
    )
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as r, Proxy(r.port) as proxy:
        direct = grpclib.client.Channel("127.0.0.1", proxy.port)
        try:
            async with device_server(
                direct, [device], options=keepalive(disable_fc=disable_fc)
            ) as running:
                serving_task = running.serve({KEY_HEADER: "kitchen"})
                pool = r.handler.key_as_channel("kitchen")
                async with asyncio.timeout(NOTICED):
                    await pool.wait_ready()
                (channel,) = r.handler.all_reverse_tunnels()
                blocked = asyncio.create_task(
                    grpchantesting.TestServiceStub(channel).unary(Message(payload=b"block"))
                )
                async with asyncio.timeout(NOTICED):
                    await device.started.wait()

                proxy.freeze()
                # The device (tunnel server) notices: serve() ends with UNAVAILABLE.
                with pytest.raises(GRPCError) as served_error:
                    async with asyncio.timeout(NOTICED):
                        await serving_task
                assert served_error.value.status is Status.UNAVAILABLE
                assert "keepalive" in (served_error.value.message or "")
                async with asyncio.timeout(NOTICED):
                    await device.cancelled.wait()
                if router_keepalive is not None:
                    # The network server (tunnel client) notices: the call fails.
                    with pytest.raises(GRPCError) as call_error:
                        async with asyncio.timeout(NOTICED):
                            await blocked
                    assert call_error.value.status is Status.UNAVAILABLE
                    assert "keepalive" in (call_error.value.message or "")
                    assert isinstance(channel.error, tunnel.KeepaliveTimeoutError)
                channel.close()
                async with asyncio.timeout(NOTICED):
                    await asyncio.gather(blocked, return_exceptions=True)
        finally:
            direct.close()


async def test_device_reconnects_after_a_silent_spell() -> None:
    """``serve_forever`` over a connection that went silent dials a new one."""
    handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata, options=keepalive())
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as r, Proxy(r.port) as proxy:
        direct = grpclib.client.Channel("127.0.0.1", proxy.port)
        device = tunnel.ReverseTunnelServer(direct, [Device("kitchen")], options=keepalive())
        forever = asyncio.create_task(
            device.serve_forever({KEY_HEADER: "kitchen"}, min_backoff=0.05, max_backoff=0.2)
        )
        try:
            pool = r.handler.key_as_channel("kitchen")
            async with asyncio.timeout(NOTICED):
                await pool.wait_ready()
            first = r.handler.all_reverse_tunnels()[0]
            proxy.freeze()
            async with asyncio.timeout(NOTICED):
                await first.wait_closed()
            proxy.thaw()
            async with asyncio.timeout(NOTICED * 2):
                while not any(not c.closed for c in r.handler.all_reverse_tunnels()):
                    await pool.wait_ready()
                    await asyncio.sleep(0)
            assert await who(pool) == "kitchen"
            assert proxy.connections >= 2  # the dead connection was not reused
        finally:
            device.close()
            async with asyncio.timeout(NOTICED):
                await forever
            direct.close()


@pytest.mark.parametrize("kind", ["forward", "reverse"])
async def test_idle_tunnel_with_a_live_peer_stays_up(kind: str) -> None:
    """Many keepalive intervals of silence: checks are answered, nothing ends."""
    interval = 0.05
    opts = keepalive(interval)
    handler = tunnel.TunnelServiceHandler(
        [Device("backend")], affinity_key=key_from_metadata, options=opts
    )
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as r, Proxy(r.port) as proxy:
        direct = grpclib.client.Channel("127.0.0.1", proxy.port)
        try:
            if kind == "forward":
                async with tunnel.open_tunnel(direct, options=opts) as channel:
                    await _answered(channel._tunnel, 10)
                    assert not channel.closed
                    assert await who(channel) == "backend"
            else:
                async with device_server(direct, [Device("kitchen")], options=opts) as running:
                    running.serve({KEY_HEADER: "kitchen"})
                    pool = r.handler.key_as_channel("kitchen")
                    async with asyncio.timeout(NOTICED):
                        await pool.wait_ready()
                    (channel,) = r.handler.all_reverse_tunnels()
                    await _answered(channel._tunnel, 10)
                    assert not channel.closed
                    assert await who(pool) == "kitchen"
            assert proxy.connections == 1
        finally:
            direct.close()


async def _answered(tunnel_: tunnel._client_tunnel.ClientTunnel, checks: int) -> None:
    """Wait (bounded) until the peer answered *checks* keepalive checks."""
    async with asyncio.timeout(TEST_TIMEOUT / 2):
        while tunnel_.keepalive_answered < checks:
            assert not tunnel_.closed, tunnel_.error
            await asyncio.sleep(0.02)
