"""A trio device serving trio handlers over reverse tunnels; a trio router calling it.

Both ends are trio programs on ``tunnel.trio``: the router runs ``serve``
with a ``TunnelServiceHandler`` that pools reverse tunnels by ``device-id``
and calls devices through ``key_as_channel``; the device runs
``ReverseTunnelServer.serve_forever`` in a nursery.
"""

from __future__ import annotations

from typing import Any

import pytest
import trio
import trio.testing
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel.trio
from tests.stubs.pb import test_grpc, test_pb2
from tests.trio.support import (
    DEVICE_KEY,
    TIMEOUT,
    TrioTestService,
    device,
    grpclib_channel,
    network_server,
)

Message = test_pb2.Message


async def test_router_calls_trio_handlers_on_a_device() -> None:
    kitchen = TrioTestService("kitchen")
    async with (
        network_server() as router,
        device(router.port, [kitchen], "kitchen"),
    ):
        channel = router.handler.key_as_channel("kitchen")
        with trio.fail_after(TIMEOUT):
            await channel.wait_ready()
        stub = test_grpc.TestServiceStub(channel)
        async with stub.Unary.open(metadata={"x-asked-by": "router"}) as stream:
            await stream.send_message(Message(payload=b"temp"), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        assert reply is not None and reply.payload == b"kitchen:temp"
        assert stream.initial_metadata is not None
        assert stream.initial_metadata["x-handled-by"] == "kitchen"
        assert stream.trailing_metadata is not None
        assert stream.trailing_metadata["x-trailer"] == "trio"
        assert kitchen.seen.metadata[-1]["x-asked-by"] == "router"
        # All four call kinds, through the device's trio handlers.
        counted = await stub.ClientStream([Message(), Message(), Message()])
        assert counted.count == 3
        streamed = await stub.ServerStream(Message(payload=b"s", count=3))
        assert [m.count for m in streamed] == [0, 1, 2]
        echoed = await stub.BidiStream([Message(payload=b"a"), Message(payload=b"b")])
        assert [m.payload for m in echoed] == [b"a", b"b"]
        # A status raised by trio code reaches the router.
        with pytest.raises(GRPCError) as failed:
            await stub.Unary(Message(code=Status.FAILED_PRECONDITION.value))
        assert failed.value.status is Status.FAILED_PRECONDITION
        assert failed.value.message == "kitchen says no"


async def test_trio_locks_in_handlers_hold_across_concurrent_calls() -> None:
    service = TrioTestService("locked")
    async with (
        network_server() as router,
        device(router.port, [service], "locked"),
    ):
        channel = router.handler.key_as_channel("locked")
        with trio.fail_after(TIMEOUT):
            await channel.wait_ready()
        stub = test_grpc.TestServiceStub(channel)
        async with trio.open_nursery() as nursery:
            for i in range(8):
                nursery.start_soon(stub.Unary, Message(payload=b"%d" % i, delay_millis=5))
        assert service.seen.most_at_once == 1


async def test_router_cancel_scope_cancels_the_device_handler() -> None:
    service = TrioTestService("dev")
    async with (
        network_server() as router,
        device(router.port, [service], "dev"),
    ):
        channel = router.handler.key_as_channel("dev")
        with trio.fail_after(TIMEOUT):
            await channel.wait_ready()
        stub = test_grpc.TestServiceStub(channel)
        with trio.move_on_after(0.2) as scope:
            await stub.Unary(Message(payload=b"block"))
        assert scope.cancelled_caught
        with trio.fail_after(TIMEOUT):
            await service.seen.cancelled.wait()
        with pytest.raises(TimeoutError):
            await stub.Unary(Message(payload=b"block"), timeout=0.2)
        assert (await stub.Unary(Message(payload=b"ok"))).payload == b"dev:ok"


async def test_cancelling_the_device_nursery_ends_its_tunnel_cleanly() -> None:
    service = TrioTestService("leaving")
    closed = trio.Event()
    closed_channels: list[Any] = []

    async def on_close(channel: Any) -> None:  # trio code, awaited by the asyncio layer
        await trio.sleep(0)
        closed_channels.append(channel)
        closed.set()

    async with network_server(on_reverse_tunnel_close=on_close) as router:
        channel = router.handler.key_as_channel("leaving")
        failure: list[GRPCError] = []

        async def ask() -> None:
            with pytest.raises(GRPCError) as failed:
                await test_grpc.TestServiceStub(channel).Unary(Message(payload=b"block"))
            failure.append(failed.value)

        async with trio.open_nursery() as router_tasks:
            async with device(router.port, [service], "leaving") as device_server:
                with trio.fail_after(TIMEOUT):
                    await channel.wait_ready()
                router_tasks.start_soon(ask)
                with trio.fail_after(TIMEOUT):
                    await service.seen.started.wait()
            # Leaving ``device(...)`` cancelled the nursery that ran serve_forever.
            assert device_server.closed
            with trio.fail_after(TIMEOUT):
                await closed.wait()
        assert service.seen.cancelled.is_set()
        assert failure[0].status in (Status.CANCELLED, Status.UNAVAILABLE)
        assert not channel.is_ready()
        assert router.handler.all_reverse_tunnels() == []
        assert closed_channels[0].metadata[DEVICE_KEY] == "leaving"


async def test_device_reconnects_after_the_router_restarts() -> None:
    service = TrioTestService("phoenix")
    attempts: list[int] = []
    connected = trio.Event()

    async def metadata() -> dict[str, str]:  # trio code, asked at each attempt
        await trio.sleep(0)
        attempts.append(len(attempts) + 1)
        return {DEVICE_KEY: "phoenix", "x-attempt": str(len(attempts))}

    async def on_connected() -> None:
        connected.set()

    async with network_server() as first:
        port = first.port
        async with grpclib_channel(port) as network, trio.open_nursery() as nursery:
            server = tunnel.trio.ReverseTunnelServer(network, [service])
            # serve_forever's own arguments pass through unchanged.
            nursery.start_soon(
                lambda: server.serve_forever(
                    metadata, min_backoff=0.05, max_backoff=0.2, on_connected=on_connected
                )
            )
            with trio.fail_after(TIMEOUT):
                await first.handler.key_as_channel("phoenix").wait_ready()
                await connected.wait()
            await first.stop()
            # A new router on the same port: serve_forever dials it again.
            async with network_server(port=port) as second:
                channel = second.handler.key_as_channel("phoenix")
                with trio.fail_after(TIMEOUT):
                    await channel.wait_ready()
                async with test_grpc.TestServiceStub(channel).Unary.open() as stream:
                    await stream.send_message(Message(payload=b"back"), end=True)
                    reply = await stream.recv_message()
                assert reply is not None and reply.payload == b"phoenix:back"
                # The tunnel now up was opened with metadata asked anew.
                assert second.handler.all_reverse_tunnels()[0].metadata["x-attempt"] == str(
                    attempts[-1]
                )
                assert len(attempts) >= 2
                nursery.cancel_scope.cancel()


async def test_permanent_refusal_ends_serve_forever_with_its_status() -> None:
    async with (
        network_server(reverse_tunnels=False) as router,
        grpclib_channel(router.port) as network,
    ):
        server = tunnel.trio.ReverseTunnelServer(network, [TrioTestService("refused")])
        with trio.fail_after(TIMEOUT), pytest.raises(GRPCError) as refused:
            await server.serve_forever(min_backoff=0.01, max_backoff=0.02)
        assert refused.value.status is Status.UNIMPLEMENTED


async def test_graceful_stop_lets_running_calls_finish() -> None:
    service = TrioTestService("graceful")
    async with (
        network_server() as router,
        device(router.port, [service], "graceful") as device_server,
    ):
        channel = router.handler.key_as_channel("graceful")
        with trio.fail_after(TIMEOUT):
            await channel.wait_ready()
        stub = test_grpc.TestServiceStub(channel)
        replies: list[bytes] = []

        async def slow_call() -> None:
            replies.append((await stub.Unary(Message(payload=b"slow", delay_millis=300))).payload)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(slow_call)
            with trio.fail_after(TIMEOUT):
                await service.seen.received.wait()
            with trio.fail_after(TIMEOUT):
                await device_server.graceful_stop()
        assert replies == [b"graceful:slow"]
        assert device_server.closed


async def test_forward_and_reverse_through_one_trio_router() -> None:
    """One trio network server: forward handlers and a reverse pool at once."""
    async with (
        network_server([TrioTestService("router")]) as router,
        device(router.port, [TrioTestService("device")], "d1"),
        grpclib_channel(router.port) as network,
        tunnel.trio.open_tunnel(network) as forward,
    ):
        reverse = router.handler.key_as_channel("d1")
        with trio.fail_after(TIMEOUT):
            await reverse.wait_ready()
        forward_reply = await test_grpc.TestServiceStub(forward).Unary(Message(payload=b"f"))
        reverse_reply = await test_grpc.TestServiceStub(reverse).Unary(Message(payload=b"r"))
        assert (forward_reply.payload, reverse_reply.payload) == (b"router:f", b"device:r")
        # A key nobody registered fails at once, as with asyncio.
        with pytest.raises(GRPCError) as missing:
            await test_grpc.TestServiceStub(router.handler.key_as_channel("nobody")).Unary(
                Message()
            )
        assert missing.value.status is Status.UNAVAILABLE


async def test_device_fallbacks_proxy_and_trio_code() -> None:
    """``fallback=``: a ``tunnel.Proxy`` (asyncio code) or an ``async def`` (trio code)."""
    seen: list[str] = []

    async def trio_fallback(method_name: str, stream: Any) -> None:
        seen.append(method_name)
        async for request in stream:  # waits for each message: trio waits
            await trio.sleep(0)
            reply = Message(payload=b"fallback:" + Message.FromString(request.data).payload)
            await stream.send_message(tunnel.RawMessage(reply.SerializeToString()))

    async with (
        network_server([TrioTestService("backend")]) as backend_server,
        grpclib_channel(backend_server.port) as backend_network,
        tunnel.trio.open_tunnel(backend_network) as backend,
        network_server() as router,
        grpclib_channel(router.port) as uplink,
        trio.open_nursery() as nursery,
    ):
        proxying = tunnel.trio.ReverseTunnelServer(uplink, [], fallback=tunnel.Proxy(backend.aio))
        nursery.start_soon(lambda: proxying.serve_forever({DEVICE_KEY: "proxying"}))
        answering = tunnel.trio.ReverseTunnelServer(uplink, [], fallback=trio_fallback)
        nursery.start_soon(lambda: answering.serve_forever({DEVICE_KEY: "answering"}))
        with trio.fail_after(TIMEOUT):
            await router.handler.key_as_channel("proxying").wait_ready()
            await router.handler.key_as_channel("answering").wait_ready()
            proxied = await test_grpc.TestServiceStub(
                router.handler.key_as_channel("proxying")
            ).Unary(Message(payload=b"p"))
            answering_stub = test_grpc.TestServiceStub(router.handler.key_as_channel("answering"))
            answered = []
            async with answering_stub.BidiStream.open() as call:
                for payload in (b"a", b"b"):  # one at a time: the handler waits between
                    await call.send_message(Message(payload=payload))
                    reply = await call.recv_message()
                    assert reply is not None
                    answered.append(reply.payload)
                await call.end()
        assert proxied.payload == b"backend:p"
        assert answered == [b"fallback:a", b"fallback:b"]
        assert seen == ["/grpchantesting.TestService/BidiStream"]
        nursery.cancel_scope.cancel()


async def test_graceful_stop_of_one_trio_device_loses_no_trio_call() -> None:
    """A rolling restart seen from trio: the refused call goes, once, to the other device."""
    stopping, staying = TrioTestService("stopping"), TrioTestService("staying")
    both_open = trio.Event()
    opened: list[Any] = []

    def on_open(channel: Any) -> None:
        opened.append(channel)
        if len(opened) == 2:
            both_open.set()

    async with (
        network_server(on_reverse_tunnel_open=on_open) as router,
        device(router.port, [stopping], "k") as first,
    ):
        pool = router.handler.key_as_channel("k")
        with trio.fail_after(TIMEOUT):
            await pool.wait_ready()
        async with device(router.port, [staying], "k"), trio.open_nursery() as calls:
            with trio.fail_after(TIMEOUT):
                await both_open.wait()
            stub = test_grpc.TestServiceStub(pool)
            held: list[bytes] = []

            async def hold() -> None:  # keeps the stopping device draining
                held.append((await stub.Unary(Message(payload=b"hold"))).payload)

            calls.start_soon(hold)
            with trio.fail_after(TIMEOUT):
                await stopping.seen.started.wait()
                calls.start_soon(first.graceful_stop)
                await trio.testing.wait_all_tasks_blocked()  # the stop has begun
                answers = [(await stub.Unary(Message(payload=b"x"))).payload for _ in range(20)]
            assert set(answers) == {b"staying:x"}
            stopping.seen.release.set()
        assert held == [b"stopping:hold"]
