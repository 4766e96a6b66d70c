"""Reverse tunnels ending: by either side, by the connection, gracefully or not."""

from __future__ import annotations

import asyncio
import collections

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing._pb.grpchantesting import TestServiceStub as Stub

from .support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Device,
    Recorder,
    connected,
    device_server,
    registered,
    router,
    who,
)

#: Statuses a call may end with when its tunnel goes away (PROTOCOL.md, Life cycle).
GONE = {Status.CANCELLED, Status.UNAVAILABLE}


def closes_recorded(handler_log: Recorder) -> tunnel.TunnelServiceHandler:
    return tunnel.TunnelServiceHandler(
        affinity_key=lambda c: c.metadata.get(KEY_HEADER),
        on_reverse_tunnel_open=lambda c: handler_log.add("open", c),
        on_reverse_tunnel_close=lambda c: handler_log.add("close", c),
    )


async def _blocked_call(channel: tunnel.ReverseChannel, service: Device) -> asyncio.Task[str]:
    call = asyncio.create_task(who(channel, b"block"))
    async with asyncio.timeout(PROMPT):
        await service.started.wait()
    return call


@pytest.mark.parametrize("how", ["device-close", "connection-dies"])
async def test_tunnel_dropping_mid_call_fails_the_call_and_leaves_the_pool(how: str) -> None:
    log = Recorder()
    handler = closes_recorded(log)
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [service]) as running,
    ):
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(handler, "dev", serving)
        pool = handler.key_as_channel("dev")
        call = await _blocked_call(pool, service)

        if how == "device-close":
            running.server.close()
        else:
            channel.close()  # the device's connection is gone

        async with asyncio.timeout(PROMPT):
            with pytest.raises(GRPCError) as failed:
                await call
        assert failed.value.status in GONE
        # The tunnel's end reaches the network server right after the call's
        # status (the device ends its streams first, then the carrying call).
        async with asyncio.timeout(PROMPT):
            await log.wait_for("close")
        # The pool never hands out a tunnel that has closed.
        assert not pool.is_ready()
        assert not handler.as_channel().is_ready()
        with pytest.raises(GRPCError) as refused:
            await who(pool)
        assert refused.value.status is Status.UNAVAILABLE
        assert handler.all_reverse_tunnels() == []
        async with asyncio.timeout(PROMPT):
            await asyncio.gather(serving, return_exceptions=True)
            await service.cancelled.wait()


async def test_close_cancels_calls_in_flight() -> None:
    services = [Device("a"), Device("b")]
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, services[:1]) as running,
    ):
        serving = running.serve({KEY_HEADER: "a"})
        await registered(net.handler, "a", serving)
        call = await _blocked_call(net.handler.as_channel(), services[0])
        running.server.close()
        async with asyncio.timeout(PROMPT):
            await services[0].cancelled.wait()
            with pytest.raises(GRPCError) as failed:
                await call
            await serving  # returns normally: we closed it
            await running.server.wait_closed()
        assert failed.value.status in GONE
        assert running.server.closed
        # A closed server opens no more tunnels.
        with pytest.raises(GRPCError):
            await running.server.serve()


async def test_network_server_closing_the_tunnel_ends_serve_normally() -> None:
    log = Recorder()
    handler = closes_recorded(log)
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [service]) as running,
    ):
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(handler, "dev", serving)
        call = await _blocked_call(handler.as_channel(), service)
        (reverse,) = handler.all_reverse_tunnels()
        reverse.close()
        async with asyncio.timeout(PROMPT):
            with pytest.raises(GRPCError) as failed:
                await call
            assert failed.value.status in GONE
            await serving  # no exception: the other side closed the tunnel
            await service.cancelled.wait()
            await log.wait_for("close")
        assert not running.server.closed
        assert handler.all_reverse_tunnels() == []


async def test_graceful_stop_lets_running_calls_finish_and_refuses_new_ones() -> None:
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, [service]) as running,
    ):
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(net.handler, "dev", serving)
        pool = net.handler.as_channel()
        call = await _blocked_call(pool, service)
        stopping = asyncio.create_task(running.server.graceful_stop())
        try:
            # New calls are refused while the running one goes on.
            with pytest.raises(GRPCError) as refused:
                await who(pool)
            assert refused.value.status is Status.UNAVAILABLE
            assert not call.done() and not stopping.done()
            service.release.set()
            async with asyncio.timeout(PROMPT):
                assert await call == "dev"
                await stopping
                await serving
        finally:
            stopping.cancel()
        assert not service.cancelled.is_set()
        assert running.server.closed


async def test_initiate_shutdown_drains_forward_and_reverse_tunnels() -> None:
    reverse_service = Device("device")
    forward_service = Device("backend")
    handler = tunnel.TunnelServiceHandler(
        [forward_service], affinity_key=lambda c: c.metadata.get(KEY_HEADER)
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [reverse_service]) as running,
        tunnel.open_tunnel(channel) as forward,
    ):
        serving = running.serve({KEY_HEADER: "device"})
        await registered(handler, "device", serving)
        pool = handler.as_channel()
        reverse_call = await _blocked_call(pool, reverse_service)
        forward_call = asyncio.create_task(who(forward, b"block"))
        async with asyncio.timeout(PROMPT):
            await forward_service.started.wait()

        handler.initiate_shutdown()

        for new_call_over in (pool, forward):
            with pytest.raises(GRPCError) as refused:
                await who(new_call_over)
            assert refused.value.status is Status.UNAVAILABLE
        assert not reverse_call.done() and not forward_call.done()
        reverse_service.release.set()
        forward_service.release.set()
        async with asyncio.timeout(PROMPT):
            assert await reverse_call == "device"
            assert await forward_call == "backend"
        # A tunnel opened after the shutdown began refuses new calls too.
        async with tunnel.open_tunnel(channel) as late:
            with pytest.raises(GRPCError) as refused:
                await who(late)
            assert refused.value.status is Status.UNAVAILABLE


async def test_serve_runs_several_tunnels_at_once() -> None:
    log = Recorder()
    handler = closes_recorded(log)
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [service]) as running,
    ):
        tasks = [running.serve({KEY_HEADER: "dev"}) for _ in range(3)]
        async with asyncio.timeout(PROMPT):
            await log.wait_for("open", 3)
        tunnels = handler.all_reverse_tunnels()
        assert len(tunnels) == 3
        # The pool spreads calls over all three tunnels of the one server.
        pool = handler.key_as_channel("dev")
        stub = Stub(pool)
        for _ in range(6):
            await stub.unary(Message(payload=b"who"))
        per_tunnel = collections.Counter(id(info) for info in service.infos)
        assert sorted(per_tunnel.values()) == [2, 2, 2]
        # The other side ends one: the other two go on.
        tunnels[0].close()
        async with asyncio.timeout(PROMPT):
            await log.wait_for("close")
            await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        assert sum(t.done() for t in tasks) == 1
        assert len(handler.all_reverse_tunnels()) == 2
        assert await who(pool) == "dev"
        running.server.close()
        async with asyncio.timeout(PROMPT):
            await asyncio.gather(*tasks)
            await running.server.wait_closed()
            await log.wait_for("close", 3)
        assert handler.all_reverse_tunnels() == []
