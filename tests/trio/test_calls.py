"""Calls from trio over a forward tunnel: metadata, statuses, deadlines, cancellation.

The calling side is trio code on ``tunnel.trio``; the far side is either the
asyncio TestService of ``tunnel.testing`` (the contract's semantics: echoed
metadata, requested statuses) or a handler written as trio code, which
reports what it saw (started, cancelled).
"""

from __future__ import annotations

import asyncio
import socket
from typing import Any

import grpclib.client
import grpclib.events
import pytest
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel.trio
from tests.stubs.pb import test_grpc, test_pb2
from tests.trio.support import (
    TIMEOUT,
    Seen,
    TrioTestService,
    asyncio_test_service,
    grpclib_channel,
    network_server,
)
from tunnel.trio._bridge import hop

Message = test_pb2.Message


async def test_metadata_in_all_three_places() -> None:
    async with (
        network_server([asyncio_test_service()]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        request = Message(
            payload=b"md",
            headers={"x-head": b"h1"},
            trailers={"x-tail": b"t1", "x-tail-bin": b"\x00\x01"},
        )
        metadata: dict[str, str | bytes] = {"x-req": "r1", "x-req-bin": b"\x01"}
        async with stub.Unary.open(metadata=metadata) as stream:
            await stream.send_message(request, end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        assert reply is not None
        assert reply.headers["x-req"] == b"r1"
        assert reply.headers["x-req-bin"] == b"\x01"
        assert stream.initial_metadata is not None
        assert stream.initial_metadata["x-head"] == "h1"
        assert stream.trailing_metadata is not None
        assert stream.trailing_metadata["x-tail"] == "t1"
        assert stream.trailing_metadata["x-tail-bin"] == b"\x00\x01"


async def test_status_and_message_of_a_failed_call() -> None:
    async with (
        network_server([asyncio_test_service()]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        with pytest.raises(GRPCError) as failed:
            await stub.Unary(Message(code=Status.NOT_FOUND.value))
        assert failed.value.status is Status.NOT_FOUND
        # The tunnel outlives a failed call.
        assert (await stub.Unary(Message(payload=b"again"))).payload == b"again"


async def test_deadline_ends_the_call_on_both_sides() -> None:
    service = TrioTestService("deadline")
    async with (
        network_server([service]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        with trio.fail_after(TIMEOUT), pytest.raises(TimeoutError):
            await stub.Unary(Message(payload=b"block"), timeout=0.2)
        # The deadline travelled: the handler was cancelled at its end too.
        with trio.fail_after(TIMEOUT):
            await service.seen.cancelled.wait()
        assert (await stub.Unary(Message(payload=b"ok"), timeout=TIMEOUT)).payload == b"deadline:ok"


async def test_deadline_of_a_streaming_call() -> None:
    async with (
        network_server([asyncio_test_service()]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        with trio.fail_after(TIMEOUT), pytest.raises(TimeoutError):
            async with stub.BidiStream.open(timeout=0.2) as stream:
                await stream.send_message(Message(payload=b"slow", delay_millis=5_000))
                await stream.recv_message()


@pytest.mark.parametrize("how", ["move_on_after", "fail_after", "cancel"])
async def test_trio_cancellation_cancels_the_call(how: str) -> None:
    service = TrioTestService("cancel")
    async with (
        network_server([service]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        if how == "move_on_after":
            with trio.move_on_after(0.2) as scope:
                await stub.Unary(Message(payload=b"block"))
            assert scope.cancelled_caught
        elif how == "fail_after":
            with pytest.raises(trio.TooSlowError):
                with trio.fail_after(0.2):
                    await stub.Unary(Message(payload=b"block"))
        else:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stub.Unary, Message(payload=b"block"))
                with trio.fail_after(TIMEOUT):
                    await service.seen.started.wait()
                nursery.cancel_scope.cancel()
        # The other end saw the call cancelled: its handler's trio task was.
        with trio.fail_after(TIMEOUT):
            await service.seen.cancelled.wait()
        assert (await stub.Unary(Message(payload=b"after"))).payload == b"cancel:after"


@pytest.mark.parametrize("scenario", ["cancel", "deadline"])
async def test_far_end_sees_the_same_as_with_an_asyncio_caller(scenario: str) -> None:
    """The handler's view of a call that its caller gave up on: trio caller vs asyncio caller.

    The asyncio caller runs on the same loop (one crossing into asyncio),
    against the same server, so the two differ only in the caller's flavour.
    """
    service = TrioTestService("far")
    async with (
        network_server([service]) as server,
        grpclib_channel(server.port) as network,
    ):
        aio_channel = await tunnel.trio.open_tunnel(network)
        seen: dict[str, tuple[str, bool, bool]] = {}

        def block_call(stub: test_grpc.TestServiceStub) -> Any:
            timeout = 0.2 if scenario == "deadline" else None
            return stub.Unary(Message(payload=b"block"), timeout=timeout)

        async def from_asyncio() -> str:
            stub = test_grpc.TestServiceStub(aio_channel.aio)
            try:
                async with asyncio.timeout(0.2 if scenario == "cancel" else None):
                    await block_call(stub)
            except TimeoutError:
                return "TimeoutError"
            return "returned"

        async def from_trio() -> str:
            stub = test_grpc.TestServiceStub(aio_channel)
            if scenario == "cancel":
                with trio.move_on_after(0.2):
                    await block_call(stub)
                return "TimeoutError"  # trio's scope caught its own cancel
            try:
                await block_call(stub)
            except TimeoutError:
                return "TimeoutError"
            return "returned"

        for flavour, caller in (("asyncio", from_asyncio), ("trio", from_trio)):
            service.seen = Seen()
            outcome = await (hop(caller) if flavour == "asyncio" else caller())
            with trio.fail_after(TIMEOUT):
                await service.seen.cancelled.wait()
            seen[flavour] = (outcome, service.seen.started.is_set(), service.seen.finished.is_set())
        await aio_channel.aclose()
    assert seen["trio"] == seen["asyncio"] == ("TimeoutError", True, False)


async def test_many_trio_tasks_share_one_tunnel() -> None:
    service = TrioTestService("shared")
    async with (
        network_server([service]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        replies: list[bytes] = []

        async def call(i: int) -> None:
            reply = await stub.Unary(Message(payload=b"%d" % i, delay_millis=5))
            replies.append(reply.payload)

        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(call, i)
        assert sorted(replies) == sorted(b"shared:%d" % i for i in range(16))
        # The handler's trio lock held: never two at once.
        assert service.seen.most_at_once == 1


async def test_large_messages_wait_for_the_writer_both_ways() -> None:
    """Past one window queued, senders on both ends wait (the one hop they make)."""
    payloads = [bytes([i]) * (1024 * 1024) for i in range(4)]
    async with (
        network_server([TrioTestService("big")]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as channel,
    ):
        stub = test_grpc.TestServiceStub(channel)
        replies = []
        with trio.fail_after(TIMEOUT):
            async with stub.BidiStream.open() as stream:
                for payload in payloads:
                    await stream.send_message(Message(payload=payload))
                    reply = await stream.recv_message()
                    assert reply is not None
                    replies.append(reply.payload)
                await stream.end()
        assert replies == payloads


async def test_refused_tunnel_raises_the_status() -> None:
    async with (
        network_server([]) as server,
        grpclib_channel(server.port) as network,
    ):
        with pytest.raises(GRPCError) as refused:
            async with tunnel.trio.open_tunnel(network):
                pass
        assert refused.value.status is Status.UNIMPLEMENTED


async def test_tunnels_nest() -> None:
    inner_handler = tunnel.trio.TunnelServiceHandler([TrioTestService("inner")])
    async with (
        network_server([inner_handler]) as server,
        grpclib_channel(server.port) as network,
        tunnel.trio.open_tunnel(network) as outer,
        tunnel.trio.open_tunnel(outer) as inner,
    ):
        reply = await test_grpc.TestServiceStub(inner).Unary(Message(payload=b"deep"))
        assert reply.payload == b"inner:deep"


async def test_closing_the_tunnel_fails_calls_in_flight() -> None:
    service = TrioTestService("closing")
    async with (
        network_server([service]) as server,
        grpclib_channel(server.port) as network,
    ):
        channel = await tunnel.trio.open_tunnel(network)
        stub = test_grpc.TestServiceStub(channel)
        failure: list[GRPCError] = []

        async def call() -> None:
            with pytest.raises(GRPCError) as failed:
                await stub.Unary(Message(payload=b"block"))
            failure.append(failed.value)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(call)
            with trio.fail_after(TIMEOUT):
                await service.seen.started.wait()
            await channel.aclose()
        assert failure[0].status is Status.CANCELLED
        assert channel.closed
        with pytest.raises(GRPCError) as after:
            await stub.Unary(Message(payload=b"late"))
        assert after.value.status is Status.UNAVAILABLE


def test_without_open_loop_the_error_says_what_to_do() -> None:
    async def main() -> None:
        await tunnel.trio.open_tunnel(grpclib.client.Channel("127.0.0.1", 1))

    with pytest.raises(RuntimeError, match="open_loop"):
        trio.run(main)


async def test_reconnecting_channel_heals_across_a_router_restart() -> None:
    opened: list[Any] = []
    reopened = trio.Event()

    async def on_tunnel_open(tunnel_channel: Any) -> None:  # trio code
        await trio.sleep(0)
        opened.append(tunnel_channel)
        if len(opened) == 2:
            reopened.set()

    async with network_server([TrioTestService("first")]) as first:
        port = first.port
        async with grpclib_channel(port) as network:
            channel = tunnel.trio.ReconnectingTunnelChannel(
                network,
                wait_for_ready=True,
                min_backoff=0.05,
                max_backoff=0.2,
                on_tunnel_open=on_tunnel_open,
            )
            async with channel:
                stub = test_grpc.TestServiceStub(channel)
                reply = await stub.Unary(Message(payload=b"a"), timeout=TIMEOUT)
                assert reply.payload == b"first:a"
                await first.stop()
                async with network_server([TrioTestService("second")], port=port):
                    with trio.fail_after(TIMEOUT):
                        await reopened.wait()
                    reply = await stub.Unary(Message(payload=b"b"), timeout=TIMEOUT)
                    assert reply.payload == b"second:b"
                    assert channel.tunnels_opened == 2
            assert channel.closed


@pytest.mark.parametrize("how", ["cancel scope", "deadline"])
async def test_waiting_for_a_tunnel_obeys_trio_cancellation_and_deadlines(how: str) -> None:
    nobody = socket.socket()
    nobody.bind(("127.0.0.1", 0))
    port = nobody.getsockname()[1]
    nobody.close()  # nothing listens there: every attempt is refused
    async with grpclib_channel(port) as network:
        channel = tunnel.trio.ReconnectingTunnelChannel(
            network, wait_for_ready=True, min_backoff=0.05, max_backoff=0.1
        )
        async with channel:
            stub = test_grpc.TestServiceStub(channel)
            with trio.fail_after(TIMEOUT):
                if how == "cancel scope":
                    with trio.move_on_after(0.2) as scope:
                        await stub.Unary(Message(payload=b"x"))
                    assert scope.cancelled_caught
                else:
                    with pytest.raises(TimeoutError):
                        await stub.Unary(Message(payload=b"x"), timeout=0.2)
            assert channel.tunnels_opened == 0
