"""Per-tunnel statistics: what a tunnel carried, as both of its ends count it."""

from __future__ import annotations

import asyncio

import grpclib.client
import grpclib.const
import grpclib.server
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import TEST_TIMEOUT, Blocking, call_until_it_ends, options, serving
from tests.reverse.support import KEY_HEADER, Device, device_server, key_from_metadata, router
from tunnel import testing
from tunnel.testing import Message


async def test_forward_tunnel_counts_calls_messages_and_bytes_at_both_ends() -> None:
    handler = tunnel.TunnelServiceHandler([testing.TestService()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                idle = channel.statistics()
                assert (idle.streams_opened, idle.messages_sent, idle.bytes_received) == (0, 0, 0)
                stub = testing.TestServiceStub(channel)
                request = Message(payload=b"p" * 1000)
                await stub.unary(request)
                replies = [r async for r in stub.server_stream(Message(payload=b"q", count=3))]
                with pytest.raises(GRPCError) as failed:
                    await stub.unary(Message(code=Status.NOT_FOUND.value))
                assert failed.value.status is Status.NOT_FOUND
                client = channel.statistics()
                (server,) = handler.forward_statistics()
                size = len(bytes(request))
                assert client.streams_opened == server.streams_opened == 3
                assert client.streams_active == server.streams_active == 0
                assert client.streams_failed == server.streams_failed == 1
                assert client.messages_sent == server.messages_received == 3
                assert client.messages_received == server.messages_sent == 1 + len(replies)
                assert client.bytes_sent == server.bytes_received >= size
                assert client.bytes_received == server.bytes_sent >= size
                assert client.age_seconds >= client.idle_seconds >= 0
                assert client.keepalive_rtt_seconds is None  # no silence yet
        finally:
            direct.close()


async def test_active_and_cancelled_streams() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler([blocking.service()])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                calls = [
                    asyncio.create_task(call_until_it_ends(channel, "Unary")) for _ in range(3)
                ]
                await blocking.started.wait(3)
                assert channel.statistics().streams_active == 3
                for call in calls:
                    call.cancel()
                await asyncio.gather(*calls, return_exceptions=True)
                await blocking.cancelled.wait(3)
                after = channel.statistics()
                assert (after.streams_active, after.streams_failed) == (0, 3)
        finally:
            direct.close()


async def test_keepalive_probes_are_timed_but_not_counted() -> None:
    opts = options(keepalive_interval=0.05, keepalive_timeout=1.0)
    handler = tunnel.TunnelServiceHandler(
        [Device("backend")], affinity_key=key_from_metadata, options=opts
    )
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as net:
        direct = grpclib.client.Channel("127.0.0.1", net.port)
        try:
            async with (
                tunnel.open_tunnel(direct, options=opts) as channel,
                device_server(direct, [Device("kitchen")], options=opts) as running,
            ):
                running.serve({KEY_HEADER: "kitchen"})
                await handler.key_as_channel("kitchen").wait_ready()
                (reverse,) = handler.all_reverse_tunnels()
                while (
                    channel._tunnel.keepalive_answered < 3 or reverse._tunnel.keepalive_answered < 3
                ):
                    await asyncio.sleep(0.02)
                for stats in (
                    channel.statistics(),
                    *handler.forward_statistics(),
                    reverse.statistics(),
                    *running.server.statistics(),
                ):
                    assert stats.streams_opened == stats.streams_failed == 0, stats
                assert channel.statistics().keepalive_rtt_seconds is not None
                assert reverse.statistics().keepalive_rtt_seconds is not None
        finally:
            direct.close()


async def test_senders_waiting_on_a_window_are_timed() -> None:
    class SlowReader:
        """Client streaming: reads one message, waits, reads the rest."""

        def __init__(self) -> None:
            self.go_on = asyncio.Event()

        async def client_stream(self, stream: grpclib.server.Stream[Message, Message]) -> None:
            await stream.recv_message()
            await self.go_on.wait()
            async for _ in stream:
                pass
            await stream.send_message(Message())

        def __mapping__(self) -> dict[str, grpclib.const.Handler]:
            return {
                "/slow.Reader/ClientStream": grpclib.const.Handler(
                    self.client_stream, grpclib.const.Cardinality.STREAM_UNARY, Message, Message
                )
            }

    slow = SlowReader()
    handler = tunnel.TunnelServiceHandler([slow])
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                call = channel.request(
                    "/slow.Reader/ClientStream",
                    grpclib.const.Cardinality.STREAM_UNARY,
                    Message,
                    Message,
                )
                async with call:
                    await call.send_message(Message(payload=b"first"))
                    sending = asyncio.ensure_future(
                        call.send_message(Message(payload=b"x" * 300_000), end=True)
                    )
                    await asyncio.sleep(0.2)  # the sender waits on a closed window meanwhile
                    assert not sending.done()
                    slow.go_on.set()
                    await sending
                    await call.recv_message()
                assert channel.statistics().send_wait_seconds >= 0.15
        finally:
            direct.close()
