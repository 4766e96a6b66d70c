"""grpclib events as interceptors, and what a tunneled handler knows of its tunnel."""

from __future__ import annotations

import asyncio
import contextvars
from typing import Any

import grpclib.server
from grpclib.const import Status
from grpclib.events import (
    RecvInitialMetadata,
    RecvMessage,
    RecvRequest,
    RecvTrailingMetadata,
    SendInitialMetadata,
    SendMessage,
    SendRequest,
    SendTrailingMetadata,
    listen,
)
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import TEST_TIMEOUT, serving, tunnel_over
from tunnel.testing import TestService
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing._pb.grpchantesting import TestServiceStub as ServiceStub

OPEN_TUNNEL = "/grpctunnel.v1.TunnelService/OpenTunnel"

identity: contextvars.ContextVar[str | None] = contextvars.ContextVar("identity", default=None)


async def test_client_events_fire_for_tunneled_calls() -> None:
    seen: list[tuple[str, Any]] = []

    async def on_send_request(event: SendRequest) -> None:
        seen.append(("SendRequest", event.method_name))
        event.metadata["x-added-by-listener"] = "yes"

    async def on_send_message(event: SendMessage) -> None:
        seen.append(("SendMessage", event.message.payload))

    async def on_recv_initial(event: RecvInitialMetadata) -> None:
        seen.append(("RecvInitialMetadata", dict(event.metadata)))

    async def on_recv_message(event: RecvMessage) -> None:
        seen.append(("RecvMessage", event.message.payload))

    async def on_recv_trailing(event: RecvTrailingMetadata) -> None:
        seen.append(("RecvTrailingMetadata", event.status))

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()])]) as served,
        tunnel_over(served.port) as channel,
    ):
        listen(channel, SendRequest, on_send_request)
        listen(channel, SendMessage, on_send_message)
        listen(channel, RecvInitialMetadata, on_recv_initial)
        listen(channel, RecvMessage, on_recv_message)
        listen(channel, RecvTrailingMetadata, on_recv_trailing)

        reply = await ServiceStub(channel).unary(Message(payload=b"hi"))
        # The service echoes the request metadata the handler saw.
        assert reply.headers.get("x-added-by-listener") == b"yes"
        assert seen == [
            ("SendRequest", "/grpchantesting.TestService/Unary"),
            ("SendMessage", b"hi"),
            ("RecvInitialMetadata", {}),
            ("RecvMessage", b"hi"),
            ("RecvTrailingMetadata", Status.OK),
        ]


async def test_server_events_on_the_handler_fire_for_tunneled_handlers() -> None:
    seen: list[tuple[str, Any]] = []

    async def on_recv_request(event: RecvRequest) -> None:
        seen.append(("RecvRequest", event.method_name))
        event.metadata["x-added-on-server"] = "yes"

    async def on_recv_message(event: RecvMessage) -> None:
        seen.append(("RecvMessage", event.message.payload))

    async def on_send_initial(event: SendInitialMetadata) -> None:
        seen.append(("SendInitialMetadata", dict(event.metadata)))

    async def on_send_message(event: SendMessage) -> None:
        seen.append(("SendMessage", event.message.payload))

    async def on_send_trailing(event: SendTrailingMetadata) -> None:
        seen.append(("SendTrailingMetadata", event.status))
        event.metadata["x-trailer-by-listener"] = "t"

    handler = tunnel.TunnelServiceHandler([TestService()])
    listen(handler, RecvRequest, on_recv_request)
    listen(handler, RecvMessage, on_recv_message)
    listen(handler, SendInitialMetadata, on_send_initial)
    listen(handler, SendMessage, on_send_message)
    listen(handler, SendTrailingMetadata, on_send_trailing)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler]) as served,
        tunnel_over(served.port) as channel,
    ):
        async with ServiceStub(channel).channel.request(
            "/grpchantesting.TestService/Unary",
            grpclib.const.Cardinality.UNARY_UNARY,
            Message,
            Message,
        ) as stream:
            await stream.send_message(Message(payload=b"hi"), end=True)
            reply = await stream.recv_message()
            await stream.recv_trailing_metadata()
        assert reply is not None
        assert reply.headers.get("x-added-on-server") == b"yes"
        assert stream.trailing_metadata is not None
        assert stream.trailing_metadata.get("x-trailer-by-listener") == "t"
        assert seen == [
            ("RecvRequest", "/grpchantesting.TestService/Unary"),
            ("RecvMessage", b"hi"),
            ("SendInitialMetadata", {}),
            ("SendMessage", b"hi"),
            ("SendTrailingMetadata", Status.OK),
        ]


async def test_server_listener_identity_and_current_tunnel_inside_handlers() -> None:
    """A RecvRequest listener on the Server authenticates the tunnel once.

    What it puts in a context variable while OpenTunnel is handled is seen
    by every tunneled handler, and so is ``current_tunnel()``.
    """
    observed: list[tuple[str | None, tunnel.TunnelInfo | None]] = []

    async def who(stream: grpclib.server.Stream[Message, Message]) -> None:
        await stream.recv_message()
        observed.append((identity.get(), tunnel.current_tunnel()))
        await stream.send_message(Message(payload=(identity.get() or "").encode()))

    async def authenticate(event: RecvRequest) -> None:
        if event.method_name == OPEN_TUNNEL:
            token = event.metadata.get("authorization")
            if token != "Bearer alice-token":
                raise GRPCError(Status.UNAUTHENTICATED, "who are you?")
            identity.set("alice")

    from tests.integration.support import Probe, probe_call

    probe = Probe(Who=(grpclib.const.Cardinality.UNARY_UNARY, who))
    server_handlers: list[Any] = [tunnel.TunnelServiceHandler([probe])]
    async with asyncio.timeout(TEST_TIMEOUT), serving(server_handlers) as served:
        listen(served.server, RecvRequest, authenticate)
        async with tunnel_over(
            served.port, metadata={"authorization": "Bearer alice-token", "x-device": "d1"}
        ) as channel:
            for _ in range(2):
                async with probe_call(
                    channel, "Who", grpclib.const.Cardinality.UNARY_UNARY
                ) as stream:
                    await stream.send_message(Message(), end=True)
                    reply = await stream.recv_message()
                assert reply is not None and reply.payload == b"alice"
            peer = channel.peer

        assert len(observed) == 2
        name, info = observed[0]
        assert name == "alice"
        assert info is not None
        assert info.kind == "forward"
        assert info.metadata.get("x-device") == "d1"
        assert info.metadata.get("authorization") == "Bearer alice-token"
        assert info.peer is not None and peer is not None
        # The server sees our end of the connection: its address is our local one.
        address = info.peer.addr()
        assert address is not None and address[0] == "127.0.0.1"

        # The same listener refuses a tunnel without credentials.
        try:
            async with tunnel_over(served.port):
                raise AssertionError("the tunnel should have been refused")
        except GRPCError as exc:
            assert exc.status is Status.UNAUTHENTICATED
            assert exc.message == "who are you?"
        assert tunnel.current_tunnel() is None
