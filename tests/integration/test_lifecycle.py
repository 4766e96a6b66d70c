"""How calls end when their tunnel ends: closed by us, or lost under us.

Whatever ends the tunnel, every call in flight ends promptly with a gRPC
status (never a hang, never a bare transport error), the handlers on the
other side are cancelled, and no task is left behind.
"""

from __future__ import annotations

import asyncio

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    CARDINALITY,
    FLOW_CONTROL,
    TEST_TIMEOUT,
    Blocking,
    Proxy,
    call_until_it_ends,
    fc_id,
    options,
    probe_call,
    serving,
    tunnel_over,
)
from tunnel.testing._pb.grpchantesting import Message

#: How long a call may take to notice that its tunnel ended.
PROMPTLY = 5.0

ENDED = {Status.CANCELLED, Status.UNAVAILABLE}


async def start_blocked_calls(
    channel: tunnel.TunnelChannel, blocking: Blocking, *, flood: bool
) -> list[asyncio.Task[BaseException | None]]:
    """One call of every kind, all blocked in their handlers (plus a flooder)."""
    calls = [
        asyncio.create_task(call_until_it_ends(channel, kind), name=f"call {kind}")
        for kind in Blocking.KINDS
    ]
    expected = len(calls)
    if flood:
        calls.append(asyncio.create_task(call_until_it_ends(channel, "ClientStream", flood=True)))
        expected += 1
    await blocking.started.wait(expected)
    return calls


def assert_ended_with_status(outcomes: list[BaseException | None], statuses: set[Status]) -> None:
    for outcome in outcomes:
        assert isinstance(outcome, GRPCError), repr(outcome)
        assert outcome.status in statuses, repr(outcome)


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_close_ends_every_call_in_flight(disable_fc: bool) -> None:
    blocking = Blocking()
    opts = options(disable_flow_control=disable_fc)
    handler = tunnel.TunnelServiceHandler([blocking.service()], options=opts)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        calls = await start_blocked_calls(channel, blocking, flood=True)

        channel.close()
        async with asyncio.timeout(PROMPTLY):
            outcomes = await asyncio.gather(*calls)
            await channel.wait_closed()
            # The other side sees the end of the tunnel too.
            await blocking.cancelled.wait(len(calls))
        assert_ended_with_status(outcomes, ENDED)
        assert channel.closed
        assert channel.error is None

        # A call after close fails at once, without reaching anything.
        for kind, cardinality in CARDINALITY.items():
            with pytest.raises(GRPCError) as exc_info:
                async with asyncio.timeout(1):
                    async with probe_call(channel, kind, cardinality) as stream:
                        await stream.send_message(Message())
            assert exc_info.value.status is Status.UNAVAILABLE
        assert blocking.started.count == len(calls)


async def test_leaving_open_tunnel_closes_it() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        async with tunnel_over(served.port) as channel:
            calls = await start_blocked_calls(channel, blocking, flood=False)
        assert channel.closed and channel.error is None
        async with asyncio.timeout(PROMPTLY):
            outcomes = await asyncio.gather(*calls)
        assert_ended_with_status(outcomes, ENDED)


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_server_close_ends_every_call(disable_fc: bool) -> None:
    """``Server.close()`` on the network server: grpclib sends nothing, yet no call hangs."""
    blocking = Blocking()
    opts = options(disable_flow_control=disable_fc)
    handler = tunnel.TunnelServiceHandler([blocking.service()], options=opts)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        calls = await start_blocked_calls(channel, blocking, flood=True)

        served.server.close()
        async with asyncio.timeout(PROMPTLY):
            outcomes = await asyncio.gather(*calls)
            await channel.wait_closed()
        assert_ended_with_status(outcomes, ENDED)
        assert blocking.cancelled.count == len(calls)
        assert channel.closed
        assert channel.error is not None


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_connection_cut_ends_every_call(disable_fc: bool) -> None:
    blocking = Blocking()
    opts = options(disable_flow_control=disable_fc)
    handler = tunnel.TunnelServiceHandler([blocking.service()], options=opts)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler]) as served,
        Proxy(served.port) as proxy,
        tunnel_over(proxy.port, opts=opts) as channel,
    ):
        calls = await start_blocked_calls(channel, blocking, flood=True)

        proxy.cut()
        async with asyncio.timeout(PROMPTLY):
            outcomes = await asyncio.gather(*calls)
            await channel.wait_closed()
            await blocking.cancelled.wait(len(calls))
        assert_ended_with_status(outcomes, {Status.UNAVAILABLE})
        assert channel.closed
        assert channel.error is not None


async def test_carrying_channel_closed_under_the_tunnel() -> None:
    """The network client's own connection closed (``Channel.close()``)."""
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                calls = await start_blocked_calls(channel, blocking, flood=False)
                direct.close()
                async with asyncio.timeout(PROMPTLY):
                    outcomes = await asyncio.gather(*calls)
                    await channel.wait_closed()
                    await blocking.cancelled.wait(len(calls))
                assert_ended_with_status(outcomes, {Status.UNAVAILABLE})
                assert channel.error is not None
        finally:
            direct.close()
