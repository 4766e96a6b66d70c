"""A connection that drops under a tunnel: every call ends, at once, with UNAVAILABLE.

The retry-at-once pattern: a call fails because its tunnel's connection was
lost, and the caller retries immediately on the same channel.  The retry
must fail at once too (the tunnel is ending or over), never hang.  The same
event gives the same status on both kinds of tunnel channel: UNAVAILABLE
naming the cause, with ``error`` set; CANCELLED is only for the owner's own
``close()``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    CARDINALITY,
    TEST_TIMEOUT,
    Blocking,
    call_until_it_ends,
    probe_call,
    serving,
)
from tests.reverse.support import Device, device_server, router, who
from tunnel import _seam
from tunnel.testing._pb import grpchantesting
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing.service import TestService

#: How long a call may take to fail once its tunnel is gone.
AT_ONCE = 2.0


async def fails_at_once(call: Awaitable[object]) -> GRPCError:
    """Await *call* (a coroutine or a task); it must raise a GRPCError within ``AT_ONCE``."""
    with pytest.raises(GRPCError) as exc_info:
        async with asyncio.timeout(AT_ONCE):
            await call
    return exc_info.value


async def test_forward_retry_right_after_the_connection_drops() -> None:
    handler = tunnel.TunnelServiceHandler([TestService()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            channel = await tunnel.open_tunnel(direct)
            stub = grpchantesting.TestServiceStub(channel)
            assert (await stub.unary(Message(payload=b"ok"))).payload == b"ok"

            direct.close()
            first = await fails_at_once(stub.unary(Message()))
            # Retried at once, on the same channel, again and again.
            retries = [await fails_at_once(stub.unary(Message())) for _ in range(20)]
            for error in (first, *retries):
                assert error.status is Status.UNAVAILABLE, error
                assert error.message is not None and "tunnel closed" in error.message
            assert channel.error is not None
            await channel.aclose()
        finally:
            direct.close()


async def test_forward_calls_started_while_the_tunnel_ends_all_end() -> None:
    """A burst of calls racing the end of the tunnel: none is accepted and forgotten."""
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            channel = await tunnel.open_tunnel(direct)
            first = asyncio.create_task(call_until_it_ends(channel, "Unary"))
            await blocking.started.wait(1)

            async def keep_calling() -> list[BaseException | None]:
                outcomes = []
                for _ in range(50):
                    outcomes.append(await call_until_it_ends(channel, "Unary"))
                    await asyncio.sleep(0)
                return outcomes

            racers = [asyncio.create_task(keep_calling()) for _ in range(5)]
            await asyncio.sleep(0)
            direct.close()
            async with asyncio.timeout(AT_ONCE * 5):
                first_outcome, batches = await asyncio.gather(first, asyncio.gather(*racers))
            outcomes = [first_outcome, *(o for batch in batches for o in batch)]
            # Calls that began before the drop may have reached the handler;
            # every one of them ends, and those after it fail UNAVAILABLE.
            ended = [o for o in outcomes if isinstance(o, GRPCError)]
            assert ended and all(o.status is Status.UNAVAILABLE for o in ended), outcomes
            assert all(o is not None for o in outcomes)
            await channel.aclose()
        finally:
            direct.close()


async def test_close_cancels_calls_in_flight_and_refuses_new_ones() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            channel = await tunnel.open_tunnel(direct)
            call = asyncio.create_task(call_until_it_ends(channel, "Unary"))
            await blocking.started.wait(1)
            channel.close()
            async with asyncio.timeout(AT_ONCE):
                outcome = await call
            assert isinstance(outcome, GRPCError) and outcome.status is Status.CANCELLED
            retry = await fails_at_once(_unary(channel))
            assert retry.status is Status.UNAVAILABLE
            await channel.wait_closed()
            assert channel.error is None
        finally:
            direct.close()


@pytest.mark.parametrize("how", ["device channel closed", "device killed"])
async def test_reverse_retry_right_after_the_connection_drops(how: str) -> None:
    """The network server's side: the device's connection is lost."""
    device = Device("kitchen")
    async with asyncio.timeout(TEST_TIMEOUT), router() as r:
        direct = grpclib.client.Channel("127.0.0.1", r.port)
        try:
            async with device_server(direct, [device]) as running:
                running.serve({"x-key": "kitchen"})
                pool = r.handler.key_as_channel("kitchen")
                async with asyncio.timeout(AT_ONCE):
                    await pool.wait_ready()
                assert await who(pool) == "kitchen"
                (channel,) = r.handler.all_reverse_tunnels()
                stub = grpchantesting.TestServiceStub(channel)
                blocked = asyncio.create_task(stub.unary(Message(payload=b"block")))
                async with asyncio.timeout(AT_ONCE):
                    await device.started.wait()

                if how == "device channel closed":
                    direct.close()
                else:
                    _seam.drop_connections(r.connections)
                first = await fails_at_once(blocked)
                retries = [await fails_at_once(stub.unary(Message())) for _ in range(20)]
                for error in (first, *retries):
                    assert error.status is Status.UNAVAILABLE, error
                    assert error.message is not None and "tunnel closed" in error.message
                assert "connection lost" in (first.message or ""), first
                async with asyncio.timeout(AT_ONCE):
                    await channel.wait_closed()
                assert isinstance(channel.error, tunnel.TunnelClosedError)
                # The pool forgot the tunnel: a call by key fails at once too.
                by_key = await fails_at_once(who(pool))
                assert by_key.status is Status.UNAVAILABLE
        finally:
            direct.close()


async def test_reverse_close_by_the_owner_cancels() -> None:
    device = Device("kitchen")
    async with asyncio.timeout(TEST_TIMEOUT), router() as r:
        direct = grpclib.client.Channel("127.0.0.1", r.port)
        try:
            async with device_server(direct, [device]) as running:
                running.serve({"x-key": "kitchen"})
                pool = r.handler.key_as_channel("kitchen")
                async with asyncio.timeout(AT_ONCE):
                    await pool.wait_ready()
                (channel,) = r.handler.all_reverse_tunnels()
                blocked = asyncio.create_task(
                    grpchantesting.TestServiceStub(channel).unary(Message(payload=b"block"))
                )
                async with asyncio.timeout(AT_ONCE):
                    await device.started.wait()
                channel.close()
                error = await fails_at_once(blocked)
                assert error.status is Status.CANCELLED
                async with asyncio.timeout(AT_ONCE):
                    await channel.wait_closed()
                assert channel.error is None
        finally:
            direct.close()


async def _unary(channel: grpclib.client.Channel) -> None:
    async with probe_call(channel, "Unary", CARDINALITY["Unary"]) as stream:
        await stream.send_message(Message(), end=True)
        await stream.recv_message()
