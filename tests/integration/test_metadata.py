"""Metadata through a tunnel: what travels, and what fails only its own call."""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.client
import pytest
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    FLOW_CONTROL,
    TEST_TIMEOUT,
    all_kinds,
    connected,
    fc_id,
    options,
    serving,
    tunnel_over,
)
from tunnel.testing import TestService
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing.service import SERVICE_NAME

REQUEST_METADATA: list[tuple[str, str | bytes]] = [
    ("x-text", "hello"),
    ("x-text", "again"),
    ("x-data-bin", b"\x00\x01\x02\x03"),
    ("x-utf8-bin", "héllo".encode()),
]


def application(metadata: Any) -> list[tuple[str, str | bytes]]:
    return sorted(
        (k, v) for k, v in metadata.items() if not k.startswith("grpc-") and k != "content-type"
    )


async def unary_observed(
    channel: grpclib.client.Channel, request: Message, metadata: Any = None
) -> tuple[Any, ...]:
    async with channel.request(
        f"/{SERVICE_NAME}/Unary",
        Cardinality.UNARY_UNARY,
        Message,
        Message,
        metadata=metadata,
    ) as stream:
        await stream.send_message(request, end=True)
        reply = await stream.recv_message()
        await stream.recv_trailing_metadata()
    assert reply is not None
    return (
        sorted(reply.headers.items()),
        application(stream.initial_metadata),
        application(stream.trailing_metadata),
    )


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_metadata_round_trips_as_with_grpclib(disable_fc: bool) -> None:
    opts = options(disable_flow_control=disable_fc)
    request = Message(
        payload=b"p",
        headers={"x-h": b"header", "x-h-bin": b"\x00\x01"},
        trailers={"x-t": b"trailer", "x-t-bin": "ünï".encode()},
    )
    service = TestService()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([service, tunnel.TunnelServiceHandler([service], options=opts)]) as served,
        connected(served.port) as direct,
        tunnel_over(served.port, opts=opts) as tunneled,
    ):
        expected = await unary_observed(direct, request, REQUEST_METADATA)
        echoed, headers, trailers = expected
        assert ("x-data-bin", b"\x00\x01\x02\x03") in echoed
        assert ("x-h-bin", b"\x00\x01") in headers
        assert ("x-t-bin", "ünï".encode()) in trailers
        assert await unary_observed(tunneled, request, REQUEST_METADATA) == expected


async def test_non_utf8_binary_request_metadata_fails_only_its_call() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()])]) as served,
        tunnel_over(served.port) as channel,
    ):
        bad = [("x-ok", "fine"), ("x-bad-bin", b"\xff\xfe\x00")]
        with pytest.raises(ValueError, match="x-bad-bin"):
            await unary_observed(channel, Message(), bad)
        await all_kinds(channel)
        assert channel.error is None and not channel.closed


@pytest.mark.parametrize("where", ["headers", "trailers"])
async def test_non_utf8_binary_response_metadata_fails_only_its_call(where: str) -> None:
    bad = {"x-bad-bin": b"\xff\xfe\x00"}
    request = Message(headers=bad) if where == "headers" else Message(trailers=bad)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([TestService()])]) as served,
        tunnel_over(served.port) as channel,
    ):
        with pytest.raises(GRPCError) as exc_info:
            await unary_observed(channel, request)
        assert exc_info.value.status is Status.INTERNAL
        assert "x-bad-bin" in (exc_info.value.message or "")
        await all_kinds(channel)
        assert channel.error is None and not channel.closed
