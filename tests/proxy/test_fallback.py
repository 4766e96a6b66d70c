"""Fallbacks on a grpclib Server and on the tunnels' registries, and choosing targets.

The fallbacks here are small handlers written in each test, so that what
they receive (method name, messages, stream) is visible; ``test_proxy.py``
has the ``Proxy`` behind them.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from typing import Any

import grpclib.client
import grpclib.events
import grpclib.server
import pytest
from google.rpc import error_details_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError
from multidict import MultiMapping

import tunnel
from tunnel.testing._pb import grpchantesting as bp
from tunnel.testing._pb.grpchantesting import Message

from .support import DEVICE_KEY, KEY_HEADER, PROMPT, TEST_TIMEOUT, Stack, open_route

pytestmark = pytest.mark.timeout(60)

UNARY = "/grpchantesting.TestService/Unary"


class Echo:
    """A fallback that answers every message with its method name and bytes."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.streams: list[grpclib.server.Stream[Any, Any]] = []

    async def __call__(
        self, method_name: str, stream: grpclib.server.Stream[tunnel.RawMessage, tunnel.RawMessage]
    ) -> None:
        self.names.append(method_name)
        self.streams.append(stream)
        async for message in stream:
            assert isinstance(message, tunnel.RawMessage)
            await stream.send_message(tunnel.RawMessage(method_name.encode() + message.data))


class Local:
    """A registered handler for ``UNARY``: registered methods must win."""

    async def unary(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        await stream.recv_message()
        await stream.send_message(Message(payload=b"local"))

    def __mapping__(self) -> dict[str, Handler]:
        return {UNARY: Handler(self.unary, Cardinality.UNARY_UNARY, Message, Message)}


async def unary_raw(
    channel: grpclib.client.Channel, name: str, data: bytes, metadata: Any = None
) -> bytes:
    async with asyncio.timeout(TEST_TIMEOUT):
        call = channel.request(
            name, Cardinality.UNARY_UNARY, tunnel.RawMessage, tunnel.RawMessage, metadata=metadata
        )
        async with call:
            await call.send_message(tunnel.RawMessage(data), end=True)
            reply = await call.recv_message()
    assert reply is not None
    return reply.data


@contextlib.asynccontextmanager
async def stack() -> AsyncIterator[Stack]:
    async with contextlib.AsyncExitStack() as exits:
        yield Stack(exits)


# -- grpclib Server ---------------------------------------------------------------------


async def test_a_grpclib_server_sends_what_it_does_not_serve_to_its_fallback() -> None:
    echo = Echo()
    async with stack() as s:
        channel = s.channel(await s.serve([Local()], fallback=echo))
        assert await unary_raw(channel, "/any.Service/Method", b"!") == b"/any.Service/Method!"
        reply = await bp.TestServiceStub(channel).unary(Message(), timeout=TEST_TIMEOUT)
        assert reply.payload == b"local"  # registered: never the fallback
    assert echo.names == ["/any.Service/Method"]


async def test_server_events_fire_for_fallback_calls() -> None:
    seen: list[str] = []

    async def on_request(event: grpclib.events.RecvRequest) -> None:
        seen.append(event.method_name)

    async with stack() as s:
        server = grpclib.server.Server([])
        grpclib.events.listen(server, grpclib.events.RecvRequest, on_request)
        tunnel.install_fallback(server, Echo())
        channel = s.channel(await s.start(server))
        await unary_raw(channel, "/any.Service/Method", b"")
    assert seen == ["/any.Service/Method"]


async def test_an_ill_formed_path_is_not_given_to_the_fallback() -> None:
    echo = Echo()
    async with stack() as s:
        channel = s.channel(await s.serve([], fallback=echo))
        with pytest.raises(GRPCError) as failed:
            await unary_raw(channel, "/no-method-part", b"")
    # grpclib's UNIMPLEMENTED, as its client reports it (GRPCLIB-NOTES 3.2).
    assert failed.value.status in (Status.UNIMPLEMENTED, Status.UNKNOWN)
    assert echo.names == []


async def test_install_fallback_is_refused_after_start() -> None:
    async with stack() as s:
        server = grpclib.server.Server([])
        await s.start(server)
        with pytest.raises(RuntimeError):
            tunnel.install_fallback(server, Echo())


# -- tunnels' registries ------------------------------------------------------------------


async def test_a_forward_tunnel_handler_with_only_a_fallback_accepts_tunnels() -> None:
    echo = Echo()
    async with stack() as s:
        handler = tunnel.TunnelServiceHandler(fallback=echo)
        channel = s.channel(await s.serve([handler]))
        async with tunnel.open_tunnel(channel) as tunneled:
            # The tunnel's core canonicalises the name before the fallback sees it.
            assert await unary_raw(tunneled, "pkg.Svc/Call", b"?") == b"/pkg.Svc/Call?"
        assert isinstance(echo.streams[0], grpclib.server.Stream)


async def test_a_forward_tunnel_handler_without_services_or_fallback_refuses() -> None:
    async with stack() as s:
        channel = s.channel(await s.serve([tunnel.TunnelServiceHandler()]))
        with pytest.raises(GRPCError) as failed:
            async with asyncio.timeout(TEST_TIMEOUT), tunnel.open_tunnel(channel):
                pass
    assert failed.value.status is Status.UNIMPLEMENTED


async def test_a_device_serves_its_services_and_sends_the_rest_to_its_fallback() -> None:
    echo = Echo()
    async with stack() as s:
        handler = tunnel.TunnelServiceHandler(affinity_key=lambda t: t.metadata.get("device-key"))
        port = await s.serve([handler])
        device = tunnel.ReverseTunnelServer(s.channel(port), [Local()], fallback=echo)
        serving = asyncio.create_task(device.serve({"device-key": DEVICE_KEY}))
        try:
            to_device = handler.key_as_channel(DEVICE_KEY)
            async with asyncio.timeout(PROMPT):
                await to_device.wait_ready()
            assert await unary_raw(to_device, "/a.B/C", b"x") == b"/a.B/Cx"
            reply = await bp.TestServiceStub(to_device).unary(Message(), timeout=TEST_TIMEOUT)
            assert reply.payload == b"local"
        finally:
            device.close()
            async with asyncio.timeout(PROMPT):
                await asyncio.gather(serving, return_exceptions=True)
    assert echo.names == ["/a.B/C"]


@pytest.mark.parametrize("where", ["grpclib", "forward", "reverse"])
async def test_a_fallback_refusing_a_call_gives_the_caller_its_status(where: str) -> None:
    detail = error_details_pb2.ErrorInfo(reason="NOPE")

    async def refuse(method_name: str, stream: grpclib.server.Stream[Any, Any]) -> None:
        raise GRPCError(Status.PERMISSION_DENIED, f"not {method_name}", [detail])

    async with stack() as s:
        if where == "grpclib":
            channel = s.channel(await s.serve([], fallback=refuse))
        elif where == "forward":
            port = await s.serve([tunnel.TunnelServiceHandler(fallback=refuse)])
            channel = await s.exits.enter_async_context(tunnel.open_tunnel(s.channel(port)))
        else:
            handler = tunnel.TunnelServiceHandler(affinity_key=lambda t: t.metadata.get("k"))
            port = await s.serve([handler])
            device = tunnel.ReverseTunnelServer(s.channel(port), [], fallback=refuse)
            serving = asyncio.create_task(device.serve({"k": "d"}))

            async def stop() -> None:
                device.close()
                async with asyncio.timeout(PROMPT):
                    await asyncio.gather(serving, return_exceptions=True)

            s.exits.push_async_callback(stop)
            channel = handler.key_as_channel("d")
            async with asyncio.timeout(PROMPT):
                await channel.wait_ready()
        with pytest.raises(GRPCError) as failed:
            await unary_raw(channel, "/x.Y/Z", b"")
    assert (failed.value.status, failed.value.message) == (
        Status.PERMISSION_DENIED,
        "not /x.Y/Z",
    )
    assert failed.value.details == [detail]


# -- choosing the target ------------------------------------------------------------------


async def test_the_router_refuses_a_call_without_a_key() -> None:
    async with open_route("reverse") as route:
        stub = bp.TestServiceStub(route.channel)
        with pytest.raises(GRPCError) as failed:
            await stub.unary(Message(), timeout=TEST_TIMEOUT)
    assert failed.value.status is Status.INVALID_ARGUMENT
    assert KEY_HEADER in (failed.value.message or "")


async def test_the_router_answers_unavailable_for_a_key_without_a_tunnel() -> None:
    async with open_route("reverse") as route:
        stub = bp.TestServiceStub(route.channel)
        with pytest.raises(GRPCError) as failed:
            await stub.unary(Message(), metadata={KEY_HEADER: "nobody"}, timeout=TEST_TIMEOUT)
    assert failed.value.status is Status.UNAVAILABLE
    assert "nobody" in (failed.value.message or "")


async def test_an_async_chooser_is_awaited_and_sees_method_and_metadata() -> None:
    asked: list[tuple[str, str]] = []
    async with stack() as s:
        backend = s.channel(await s.serve([], fallback=Echo()))

        async def choose(method_name: str, metadata: MultiMapping[Any]) -> grpclib.client.Channel:
            await asyncio.sleep(0)
            asked.append((method_name, metadata["x-route"]))
            return backend

        channel = s.channel(await s.serve([], fallback=tunnel.Proxy(choose)))
        reply = await unary_raw(channel, "/r.S/M", b"1", metadata={"x-route": "b"})
    assert reply == b"/r.S/M1"
    assert asked == [("/r.S/M", "b")]


async def test_an_unreachable_target_gives_unavailable() -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP) as sock:
        sock.bind(("127.0.0.1", 0))
        closed_port = sock.getsockname()[1]  # nobody listens there once closed
    async with stack() as s:
        nowhere = s.channel(closed_port)
        channel = s.channel(await s.serve([], fallback=tunnel.Proxy(nowhere)))
        with pytest.raises(GRPCError) as failed:
            await unary_raw(channel, "/r.S/M", b"")
    assert failed.value.status is Status.UNAVAILABLE


async def test_a_closed_tunnel_as_target_gives_unavailable() -> None:
    async with stack() as s:
        port = await s.serve([tunnel.TunnelServiceHandler(fallback=Echo())])
        tunneled = await tunnel.open_tunnel(s.channel(port))
        await tunneled.aclose()
        channel = s.channel(await s.serve([], fallback=tunnel.Proxy(tunneled)))
        with pytest.raises(GRPCError) as failed:
            await unary_raw(channel, "/r.S/M", b"")
    assert failed.value.status is Status.UNAVAILABLE


async def test_calls_through_the_router_reach_the_registered_device() -> None:
    async with open_route("reverse") as route:
        assert route.handler is not None
        assert [c.metadata.get("device-key") for c in route.handler.all_reverse_tunnels()] == [
            DEVICE_KEY
        ]
        reply = await bp.TestServiceStub(route.channel).unary(
            Message(payload=b"hi"), metadata=route.metadata, timeout=TEST_TIMEOUT
        )
    assert reply.payload == b"hi"
