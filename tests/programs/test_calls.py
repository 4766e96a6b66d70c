"""Caller -> router -> agent -> backend, each a process of its own.

One backend, one router and one agent serve every test in this module
(they keep no state between calls); each test makes its own calls with a
grpclib channel (or grpcio) to the router, naming the agent by key.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Iterator

import grpclib.client
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.programs.support import (
    Agent,
    Backend,
    Router,
    Stack,
    four_call_kinds,
    get,
    metadata_both_ways,
    metrics,
    processes,
    tunnels,
)
from tests.stubs.pb import test_grpc, test_pb2

KEY = "kitchen"
ROUTED = {"tunnel-key": KEY}
BIG = 16 * 1024 * 1024
TEST_TIMEOUT = 30.0


@pytest.fixture(scope="module")
def stack() -> Iterator[Stack]:
    with processes() as started:
        backend = started.add(Backend())
        router = started.add(Router("--max-message-size", str(BIG)))
        agent = started.add(Agent(router, backend, KEY, "--max-message-size", str(BIG)))
        yield Stack(backend, router, agent)


@pytest.fixture
async def channel(stack: Stack) -> AsyncIterator[grpclib.client.Channel]:
    channel = grpclib.client.Channel("127.0.0.1", stack.router.port)
    try:
        yield channel
    finally:
        channel.close()


@pytest.fixture
def stub(channel: grpclib.client.Channel) -> test_grpc.TestServiceStub:
    return test_grpc.TestServiceStub(channel)


def message(**fields: object) -> test_pb2.Message:
    return test_pb2.Message(**fields)  # type: ignore[arg-type]


async def test_the_four_call_kinds(stub: test_grpc.TestServiceStub) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        await four_call_kinds(stub, ROUTED)


async def test_metadata_both_ways_binary_included_and_authorization_stripped(
    stub: test_grpc.TestServiceStub,
) -> None:
    metadata = {**ROUTED, "authorization": "Bearer caller-secret"}
    async with asyncio.timeout(TEST_TIMEOUT):
        received = await metadata_both_ways(stub, metadata)
    assert received["tunnel-key"] == KEY.encode()
    assert "authorization" not in received


async def test_status_message_and_details_arrive_unchanged(stub: test_grpc.TestServiceStub) -> None:
    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="NO_TOAST", domain="kitchen.example"))
    request = message(code=Status.FAILED_PRECONDITION.value, error_details=[detail])
    with pytest.raises(GRPCError) as failure:
        async with asyncio.timeout(TEST_TIMEOUT):
            await stub.Unary(request, metadata=ROUTED)
    assert failure.value.status is Status.FAILED_PRECONDITION
    assert failure.value.message == "error"
    (info,) = failure.value.details
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("NO_TOAST", "kitchen.example")


async def test_the_deadline_arrives_at_the_backend(
    stack: Stack, stub: test_grpc.TestServiceStub
) -> None:
    mark = stack.backend.mark()
    async with asyncio.timeout(TEST_TIMEOUT):
        await stub.Unary(message(), metadata={**ROUTED, "x-call-id": "deadline"}, timeout=7)
    seen = await stack.backend.event("call", after=mark, id="deadline")
    assert 4 < seen["deadline"] <= 7


async def test_a_past_deadline_ends_the_call_deadline_exceeded(
    stub: test_grpc.TestServiceStub,
) -> None:
    started = time.monotonic()
    with pytest.raises((asyncio.TimeoutError, GRPCError)) as failure:
        async with asyncio.timeout(TEST_TIMEOUT):
            await stub.Unary(message(delay_millis=5000), metadata=ROUTED, timeout=0.5)
    assert time.monotonic() - started < 3
    if isinstance(failure.value, GRPCError):
        assert failure.value.status is Status.DEADLINE_EXCEEDED


async def test_a_caller_that_cancels_cancels_the_backend_handler(
    stack: Stack, stub: test_grpc.TestServiceStub
) -> None:
    mark = stack.backend.mark()
    call = asyncio.create_task(
        stub.Unary(message(delay_millis=20_000), metadata={**ROUTED, "x-call-id": "cancel-me"})
    )
    try:
        await stack.backend.event("call", after=mark, id="cancel-me")
    finally:
        call.cancel()
        await asyncio.gather(call, return_exceptions=True)
    cancelled_at = time.monotonic()
    await stack.backend.event("cancelled", 5, after=mark, id="cancel-me")
    assert time.monotonic() - cancelled_at < 2


async def test_a_10_mb_message_each_way(stub: test_grpc.TestServiceStub) -> None:
    payload = bytes(range(256)) * (10 * 1024 * 1024 // 256)
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await stub.Unary(message(payload=payload), metadata=ROUTED)
    assert reply.payload == payload


async def test_200_concurrent_calls(stub: test_grpc.TestServiceStub) -> None:
    async def one(i: int) -> bytes:
        reply = await stub.Unary(message(payload=b"%d" % i, delay_millis=50), metadata=ROUTED)
        return bytes(reply.payload)

    async with asyncio.timeout(TEST_TIMEOUT):
        replies = await asyncio.gather(*(one(i) for i in range(200)))
    assert replies == [b"%d" % i for i in range(200)]


async def test_a_grpcio_caller(stack: Stack) -> None:
    import grpc

    async with grpc.aio.insecure_channel(stack.router.address) as channel:
        unary = channel.unary_unary(
            "/grpchantesting.TestService/Unary",
            request_serializer=test_pb2.Message.SerializeToString,
            response_deserializer=test_pb2.Message.FromString,
        )
        call = unary(
            message(payload=b"from grpcio", trailers={"x-trail-bin": "\u00e9".encode()}),
            metadata=(("tunnel-key", KEY), ("x-data-bin", b"\x00\x01")),
            timeout=10,
        )
        reply = await call
        trailers = await call.trailing_metadata()
        assert reply.payload == b"from grpcio"
        assert reply.headers["x-data-bin"] == b"\x00\x01"
        assert ("x-trail-bin", "\u00e9".encode()) in tuple(trailers)

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await unary(
                message(code=Status.NOT_FOUND.value), metadata=(("tunnel-key", KEY),), timeout=10
            )
        assert failure.value.code() is grpc.StatusCode.NOT_FOUND

        with pytest.raises(grpc.aio.AioRpcError) as failure:
            await unary(message(), timeout=10)
        assert failure.value.code() is grpc.StatusCode.INVALID_ARGUMENT
        assert "tunnel-key" in (failure.value.details() or "")


async def test_no_key_and_an_unknown_key(stub: test_grpc.TestServiceStub) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(GRPCError) as failure:
            await stub.Unary(message())
        assert failure.value.status is Status.INVALID_ARGUMENT
        assert "tunnel-key" in (failure.value.message or "")
        with pytest.raises(GRPCError) as failure:
            await stub.Unary(message(), metadata={"tunnel-key": "attic"})
        assert failure.value.status is Status.UNAVAILABLE
        assert "'attic'" in (failure.value.message or "")


async def test_health_on_the_main_port_and_admin_endpoints(
    stack: Stack, channel: grpclib.client.Channel
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await HealthStub(channel).Check(HealthCheckRequest())
        assert reply.status == HealthCheckResponse.SERVING
        for admin in (stack.router.admin, stack.agent.admin):
            assert (await get(admin, "/healthz"))[0] == 200
            status, body = await get(admin, "/readyz")
            assert status == 200, body
        status, body = await get(stack.agent.admin, "/readyz")
        assert "SERVING" in body  # the backend's own health service answered
        await test_grpc.TestServiceStub(channel).Unary(message(), metadata=ROUTED)

        (tunnel,) = await tunnels(stack.router.admin)
        assert tunnel["key"] == KEY
        assert tunnel["agent_instance"] == stack.agent.instance
        assert tunnel["peer"].startswith("127.0.0.1:")
        assert tunnel["opened_at"].endswith("Z")
        assert tunnel["statistics"]["streams_opened"] >= 1  # the call above
        assert tunnel["statistics"]["age_seconds"] > 0
        agent_view = await tunnels(stack.agent.admin)
        assert agent_view["key"] == KEY
        (link,) = agent_view["routers"]
        assert link["router"] == stack.router.address and link["connected"]


async def test_metrics_parse_and_count_calls(stack: Stack, stub: test_grpc.TestServiceStub) -> None:
    before = await metrics(stack.router.admin)
    async with asyncio.timeout(TEST_TIMEOUT):
        for _ in range(3):
            await stub.Unary(message(), metadata=ROUTED)
        with pytest.raises(GRPCError):
            await stub.Unary(message(code=Status.ABORTED.value), metadata=ROUTED)
    after = await metrics(stack.router.admin)
    ok = ("grpctunnel_router_calls_total", (("code", "OK"),))
    aborted = ("grpctunnel_router_calls_total", (("code", "ABORTED"),))
    assert after[ok] - before.get(ok, 0) == 3
    assert after[aborted] - before.get(aborted, 0) == 1
    assert after[("grpctunnel_router_tunnels", ())] == 1
    opened = ("grpctunnel_router_tunnel_streams_opened_total", ())
    assert after[opened] - before[opened] == 4
    sent = ("grpctunnel_router_tunnel_sent_bytes_total", ())
    assert after[sent] > before[sent]
    assert after[("grpctunnel_router_ready", ())] == 1
    assert all(name.startswith("grpctunnel_") for name, _ in after)
    # No label carries a key or a peer.
    labels = {label for _, pairs in after for label, _ in pairs}
    assert labels <= {"code", "reason", "le"}
    agent = await metrics(stack.agent.admin)
    assert agent[("grpctunnel_agent_tunnels", ())] == 1
    assert agent[("grpctunnel_agent_calls_total", (("code", "OK"),))] >= 3
