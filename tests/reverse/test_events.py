"""Events (interceptors) on both ends, and the reverse-credentials pattern."""

from __future__ import annotations

import asyncio
import contextvars

import pytest
from grpclib.const import Status
from grpclib.events import (
    RecvRequest,
    RecvTrailingMetadata,
    SendInitialMetadata,
    SendRequest,
    SendTrailingMetadata,
    listen,
)
from grpclib.exceptions import GRPCError

import tunnel
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing._pb.grpchantesting import TestServiceStub as Stub

from .support import (
    KEY_HEADER,
    TEST_TIMEOUT,
    Device,
    connected,
    device,
    device_server,
    registered,
    router,
    who,
)

UNARY = "/grpchantesting.TestService/Unary"
OPEN_REVERSE_TUNNEL = "/grpctunnel.v1.TunnelService/OpenReverseTunnel"


async def test_client_events_on_a_reverse_channel_and_a_reverse_tunnel() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        device(net.port, net.handler, "dev"),
    ):
        pool = net.handler.key_as_channel("dev")
        (single,) = net.handler.all_reverse_tunnels()
        seen: list[tuple[str, object]] = []

        async def on_send(event: SendRequest) -> None:
            seen.append(("pool-send", event.method_name))
            event.metadata["x-added"] = "by-pool-listener"

        async def on_trailers(event: RecvTrailingMetadata) -> None:
            seen.append(("pool-status", event.status))

        async def on_single(event: SendRequest) -> None:
            seen.append(("single-send", event.method_name))

        listen(pool, SendRequest, on_send)
        listen(pool, RecvTrailingMetadata, on_trailers)
        listen(single, SendRequest, on_single)

        reply = await Stub(pool).unary(Message(payload=b"x"))
        assert reply.payload == b"dev"
        assert seen == [("pool-send", UNARY), ("pool-status", Status.OK)]
        seen.clear()
        # A listener on one ReverseChannel is not on another one, nor on the tunnel.
        await who(net.handler.as_channel())
        assert seen == []
        await who(single)
        assert seen == [("single-send", UNARY)]


async def test_server_events_on_a_reverse_tunnel_server_fire_for_tunneled_handlers() -> None:
    seen: list[tuple[str, object]] = []

    async def on_request(event: RecvRequest) -> None:
        seen.append(("request", (event.method_name, event.metadata.get("x-from"))))

    async def on_trailers(event: SendTrailingMetadata) -> None:
        seen.append(("status", event.status))

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        listen(running.server, RecvRequest, on_request)
        listen(running.server, SendTrailingMetadata, on_trailers)
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(net.handler, "dev", serving)
        stub = Stub(net.handler.as_channel())
        await stub.unary(Message(payload=b"x"), metadata={"x-from": "router"})
        assert seen == [("request", (UNARY, "router")), ("status", Status.OK)]


_method: contextvars.ContextVar[str | None] = contextvars.ContextVar("method", default=None)

TRUSTED = "router-secret"


async def _remember_method(event: RecvRequest) -> None:
    _method.set(event.method_name)


def _credentials(token: str) -> list[tuple[type, object]]:
    """Server listeners that put *token* into OpenReverseTunnel's response headers."""

    async def add_token(event: SendInitialMetadata) -> None:
        if _method.get() == OPEN_REVERSE_TUNNEL:
            event.metadata["x-server-token"] = token

    return [(RecvRequest, _remember_method), (SendInitialMetadata, add_token)]


async def _authorize(event: RecvRequest) -> None:
    """The device's check: every tunneled call against the network server's credentials."""
    info = tunnel.current_tunnel()
    assert info is not None and info.kind == "reverse"
    if info.response_metadata.get("x-server-token") != TRUSTED:
        raise GRPCError(Status.PERMISSION_DENIED, "the network server is not trusted")


@pytest.mark.parametrize("token", [TRUSTED, "impostor"])
async def test_device_authorizes_every_call_against_the_servers_credentials(token: str) -> None:
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(listeners=_credentials(token)) as net,
        connected(net.port) as channel,
        device_server(channel, [service]) as running,
    ):
        listen(running.server, RecvRequest, _authorize)
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(net.handler, "dev", serving)
        assert running.server.response_metadata is not None
        assert running.server.response_metadata["x-server-token"] == token
        pool = net.handler.as_channel()
        for _ in range(3):
            if token == TRUSTED:
                assert await who(pool) == "dev"
            else:
                with pytest.raises(GRPCError) as denied:
                    await who(pool)
                assert denied.value.status is Status.PERMISSION_DENIED
        if token == TRUSTED:
            assert len(service.infos) == 3
            assert all(
                info is not None and info.response_metadata["x-server-token"] == TRUSTED
                for info in service.infos
            )
        else:
            assert service.infos == []  # the handler never ran
