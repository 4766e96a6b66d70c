"""Tunnels that do not open: refused by the server, or negotiation failing."""

from __future__ import annotations

import asyncio

import grpclib.server
import pytest
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    TEST_TIMEOUT,
    FakeTunnelServer,
    connected,
    options,
    serving,
    tunnel_over,
)
from tunnel._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    Metadata,
    ServerToClient,
    Settings,
)
from tunnel.testing import TestService


async def test_handler_without_services_refuses_with_unimplemented() -> None:
    async with asyncio.timeout(TEST_TIMEOUT), serving([tunnel.TunnelServiceHandler([])]) as served:
        with pytest.raises(GRPCError) as exc_info:
            async with tunnel_over(served.port):
                pass
        assert exc_info.value.status is Status.UNIMPLEMENTED


async def test_listener_refusal_reaches_open_tunnel() -> None:
    async def refuse(event: RecvRequest) -> None:
        raise GRPCError(Status.UNAUTHENTICATED, "no token")

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()])]) as served,
    ):
        listen(served.server, RecvRequest, refuse)
        for _ in range(3):  # the refusal and the stream reset race; see channel.py
            with pytest.raises(GRPCError) as exc_info:
                async with tunnel_over(served.port):
                    pass
            assert (exc_info.value.status, exc_info.value.message) == (
                Status.UNAUTHENTICATED,
                "no token",
            )


async def test_no_settings_fails_within_negotiation_timeout() -> None:
    fake = FakeTunnelServer()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([fake]) as served,
        connected(served.port) as channel,
    ):
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(tunnel.NegotiationError):
            await tunnel.open_tunnel(channel, options=options(negotiation_timeout=0.3))
        assert 0.25 < loop.time() - started < 2.0
        # The carrying call was given up, so the fake handler ended too.
        async with asyncio.timeout(5):
            await fake.ended.wait()


@pytest.mark.parametrize(
    "first",
    [
        ServerToClient(stream_id=1, response_headers=Metadata()),
        ServerToClient(
            stream_id=0,
            settings=Settings(supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE]),
        ),
        # A revision no peer knows: bad input on purpose (proto3 enums are
        # open on the wire, the generated stub's type is not).
        ServerToClient(
            stream_id=-1,
            settings=Settings(supported_protocol_revisions=[7]),  # type: ignore[list-item]
        ),
    ],
    ids=["not-settings", "settings-on-a-stream", "no-common-revision"],
)
async def test_bad_first_frame_fails_negotiation(first: ServerToClient) -> None:
    fake = FakeTunnelServer(first)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([fake]) as served,
        connected(served.port) as channel,
    ):
        with pytest.raises(tunnel.NegotiationError):
            await tunnel.open_tunnel(channel)
        async with asyncio.timeout(5):
            await fake.ended.wait()


class EndsAtOnce(FakeTunnelServer):
    async def open_tunnel(
        self, stream: grpclib.server.Stream[ClientToServer, ServerToClient]
    ) -> None:
        await stream.send_initial_metadata(metadata={"grpctunnel-negotiate": "on"})
        self.ended.set()


async def test_server_ending_before_settings_fails_negotiation() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([EndsAtOnce()]) as served,
        connected(served.port) as channel,
    ):
        with pytest.raises(tunnel.NegotiationError):
            await tunnel.open_tunnel(channel)
