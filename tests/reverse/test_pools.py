"""Reverse tunnel pools on the network server: round-robin, keys, readiness, callbacks."""

from __future__ import annotations

import asyncio
import collections
import contextvars
from collections.abc import Hashable

import pytest
from grpclib.const import Status
from grpclib.events import RecvRequest
from grpclib.exceptions import GRPCError

import tunnel
from tunnel.testing._pb.grpchantesting import Message

from .support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Device,
    Recorder,
    connected,
    device,
    device_server,
    key_from_metadata,
    registered,
    router,
    who,
)


async def test_round_robin_spreads_calls_over_three_tunnels() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        device(net.port, net.handler, "a"),
        device(net.port, net.handler, "b"),
        device(net.port, net.handler, "c"),
    ):
        channel = net.handler.as_channel()
        assert channel.is_ready()
        assert len(net.handler.all_reverse_tunnels()) == 3
        names = [await who(channel) for _ in range(30)]
        assert collections.Counter(names) == {"a": 10, "b": 10, "c": 10}
        # Strictly round-robin: every window of three calls hits all three.
        for i in range(0, 30, 3):
            assert set(names[i : i + 3]) == {"a", "b", "c"}


async def test_calls_for_a_key_reach_only_its_tunnels() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        device(net.port, net.handler, "k1", key="K"),
        device(net.port, net.handler, "k2", key="K"),
        device(net.port, net.handler, "other", key="L"),
    ):
        k_names = [await who(net.handler.key_as_channel("K")) for _ in range(20)]
        assert collections.Counter(k_names) == {"k1": 10, "k2": 10}
        l_names = {await who(net.handler.key_as_channel("L")) for _ in range(5)}
        assert l_names == {"other"}
        # A key nobody registered: UNAVAILABLE, though other tunnels exist.
        nobody = net.handler.key_as_channel("M")
        assert not nobody.is_ready()
        with pytest.raises(GRPCError) as failed:
            await who(nobody)
        assert failed.value.status is Status.UNAVAILABLE


async def test_empty_pool_fails_at_once_with_unavailable() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), router() as net:
        for channel in (net.handler.as_channel(), net.handler.key_as_channel("K")):
            assert not channel.is_ready()
            async with asyncio.timeout(PROMPT):
                with pytest.raises(GRPCError) as failed:
                    await who(channel)
            assert failed.value.status is Status.UNAVAILABLE
        assert net.handler.all_reverse_tunnels() == []


async def test_wait_ready_returns_once_a_tunnel_registers() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), router() as net:
        channel = net.handler.as_channel()
        keyed = net.handler.key_as_channel("late")
        waiting = asyncio.create_task(channel.wait_ready())
        waiting_keyed = asyncio.create_task(keyed.wait_ready())
        try:
            # Nothing registered: both keep waiting.
            await asyncio.sleep(0)
            assert not waiting.done() and not waiting_keyed.done()
            async with device(net.port, net.handler, "late"):
                async with asyncio.timeout(PROMPT):
                    await waiting
                    await waiting_keyed
                assert channel.is_ready() and keyed.is_ready()
                # Ready already: returns at once.
                async with asyncio.timeout(PROMPT):
                    await channel.wait_ready()
        finally:
            waiting.cancel()
            waiting_keyed.cancel()
            await asyncio.gather(waiting, waiting_keyed, return_exceptions=True)


async def test_a_tunnel_carries_its_metadata_and_peer() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        device(net.port, net.handler, "dev"),
    ):
        (only,) = net.handler.all_reverse_tunnels()
        assert isinstance(only, tunnel.TunnelChannel)
        assert only.metadata[KEY_HEADER] == "dev"
        assert only.peer is not None
        address = only.peer.addr()
        assert address is not None
        host, _ = address
        assert host == "127.0.0.1"
        # A single reverse TunnelChannel is a channel of its own.
        assert await who(only) == "dev"


async def test_reverse_tunnels_disabled_answers_unimplemented() -> None:
    handler = tunnel.TunnelServiceHandler(reverse_tunnels=False)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
    ):
        server = tunnel.ReverseTunnelServer(channel, [Device("d")])
        with pytest.raises(GRPCError) as failed:
            await server.serve()
        assert failed.value.status is Status.UNIMPLEMENTED
        await server.wait_closed()


_identity: contextvars.ContextVar[str | None] = contextvars.ContextVar("identity", default=None)


async def test_key_function_and_callbacks_see_the_listeners_context() -> None:
    """The key comes from a contextvar a RecvRequest listener set; callbacks in order."""
    log = Recorder()

    async def authenticate(event: RecvRequest) -> None:
        token = event.metadata.get("authorization")
        if isinstance(token, str):
            _identity.set(token.removeprefix("Bearer "))

    def key(channel: tunnel.TunnelChannel) -> Hashable:
        identity = _identity.get()
        log.add("key", identity)
        return identity

    def opened(channel: tunnel.TunnelChannel) -> None:
        log.add("open", (channel, _identity.get()))

    def closed(channel: tunnel.TunnelChannel) -> None:
        log.add("close", (channel, _identity.get()))

    handler = tunnel.TunnelServiceHandler(
        affinity_key=key, on_reverse_tunnel_open=opened, on_reverse_tunnel_close=closed
    )

    class Recording(Device):
        async def unary(self, message: Message) -> Message:
            log.add("call")
            return await super().unary(message)

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler, listeners=[(RecvRequest, authenticate)]) as net,
        connected(net.port) as channel,
        device_server(channel, [Recording("alice-device")]) as running,
    ):
        serving = running.serve({"authorization": "Bearer alice"})
        await registered(handler, "alice", serving)
        assert log.names() == ["key", "open"]
        assert await who(handler.key_as_channel("alice")) == "alice-device"
        running.server.close()
        async with asyncio.timeout(PROMPT):
            await serving
            await log.wait_for("close")
        assert log.names() == ["key", "open", "call", "close"]
        assert log.entries[0] == ("key", "alice")
        (_, (opened_channel, open_identity)) = log.entries[1]
        (_, (closed_channel, close_identity)) = log.entries[3]
        assert opened_channel is closed_channel
        assert open_identity == close_identity == "alice"
        assert opened_channel.metadata["authorization"] == "Bearer alice"
        assert opened_channel.closed
        assert not handler.key_as_channel("alice").is_ready()
        assert handler.all_reverse_tunnels() == []
        # Nothing under a key the listener did not set.
        assert not handler.key_as_channel(None).is_ready()


async def test_keys_that_come_and_go_leave_nothing_behind() -> None:
    """A router whose devices register under ever new ids must not grow.

    A key's channel, made before its device registers and kept after it
    leaves, still finds the device's next tunnel.
    """
    closed: asyncio.Queue[tunnel.TunnelChannel] = asyncio.Queue()
    handler = tunnel.TunnelServiceHandler(
        affinity_key=key_from_metadata, on_reverse_tunnel_close=closed.put_nowait
    )
    async with asyncio.timeout(TEST_TIMEOUT), router(handler) as net:
        kept = handler.key_as_channel("dev-0")
        for i in range(5):
            async with device(net.port, handler, f"dev-{i % 2}"):
                if i % 2 == 0:
                    assert await who(kept) == "dev-0"
                else:
                    assert not kept.is_ready()
            await closed.get()  # the server has seen this tunnel end
        assert handler.all_reverse_tunnels() == []
        assert not kept.is_ready()
        # Nothing is left per key (pools live only while they hold a tunnel).
        assert handler._pools._pools == {}
        async with device(net.port, handler, "dev-0"):
            assert await who(kept) == "dev-0"
        await closed.get()
