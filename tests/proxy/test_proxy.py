"""A proxied call behaves as the same call made to the backend directly.

Every test runs over each route of ``support`` (``direct`` is the control
group where the comparison needs one): a grpclib server with a fallback
proxy, a forward tunnel to a handler with a fallback proxy, and the NAT
scenario (router -> reverse tunnel -> device -> local backend).
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any, cast

import grpclib.client
import grpclib.server
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from multidict import MultiDict

import tunnel
from tests.stubs.pb import test_grpc, test_pb2
from tunnel.testing._pb import grpchantesting as bp
from tunnel.testing._pb.grpchantesting import Message

from .support import PROMPT, PROXIED, ROUTES, TEST_TIMEOUT, Probe, Route, open_route

pytestmark = pytest.mark.timeout(60)

TEST_SERVICE = "/grpchantesting.TestService/"


@pytest.fixture(params=PROXIED)
async def route(request: pytest.FixtureRequest) -> AsyncIterator[Route]:
    async with open_route(request.param) as opened:
        yield opened


async def messages(*payloads: bytes) -> AsyncIterator[Message]:
    for payload in payloads:
        yield Message(payload=payload)


# -- the four call kinds ---------------------------------------------------------


async def test_unary(route: Route) -> None:
    stub = bp.TestServiceStub(route.channel)
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await stub.unary(Message(payload=b"ping"), metadata=route.metadata)
    assert reply.payload == b"ping"


async def test_client_streaming(route: Route) -> None:
    stub = bp.TestServiceStub(route.channel)
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await stub.client_stream(messages(b"a", b"b", b"c"), metadata=route.metadata)
    assert (reply.payload, reply.count) == (b"c", 3)


async def test_client_streaming_with_no_message(route: Route) -> None:
    stub = bp.TestServiceStub(route.channel)
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await stub.client_stream(messages(), metadata=route.metadata)
    assert (reply.payload, reply.count) == (b"", 0)


async def test_server_streaming(route: Route) -> None:
    stub = bp.TestServiceStub(route.channel)
    async with asyncio.timeout(TEST_TIMEOUT):
        replies = [
            m.payload
            async for m in stub.server_stream(
                Message(payload=b"s", count=5), metadata=route.metadata
            )
        ]
    assert replies == [b"s"] * 5


async def test_bidi_streaming_ping_pong(route: Route) -> None:
    """Each reply arrives before the next request is sent: nothing waits for the end."""
    name = TEST_SERVICE + "BidiStream"
    async with asyncio.timeout(TEST_TIMEOUT):
        call = route.call(name, Cardinality.STREAM_STREAM)
        async with call:
            for i in range(1, 4):
                await call.send_message(Message(payload=bytes([i])))
                reply = await call.recv_message()
                assert reply is not None
                assert (reply.payload, reply.count) == (bytes([i]), i)
            await call.end()
            assert await call.recv_message() is None


async def test_grpclib_generated_stubs_and_protobuf_messages(route: Route) -> None:
    """A caller with protobuf (upb) messages reaches a betterproto backend unchanged."""
    stub = test_grpc.TestServiceStub(route.channel)
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await stub.Unary(test_pb2.Message(payload=b"pb"), metadata=route.metadata)
        replies = await stub.ServerStream(
            test_pb2.Message(payload=b"x", count=2), metadata=route.metadata
        )
    assert reply.payload == b"pb"
    assert [m.payload for m in replies] == [b"x", b"x"]


# -- metadata --------------------------------------------------------------------------

REQUEST_MD = {
    "x-text": "hello",
    # Valid UTF-8, so that it can travel in a tunnel too (PROTOCOL: binary
    # metadata is carried in protobuf strings).
    "x-data-bin": b"\x00\x01\xc3\xa9\x7f",
}


async def test_request_metadata_reaches_the_backend_binary_included(route: Route) -> None:
    stub = bp.TestServiceStub(route.channel)
    async with asyncio.timeout(TEST_TIMEOUT):
        reply = await stub.unary(Message(payload=b"md"), metadata=route.md(REQUEST_MD))
    assert reply.headers["x-text"] == b"hello"
    assert reply.headers["x-data-bin"] == REQUEST_MD["x-data-bin"]


async def test_response_headers_and_trailers_come_back_binary_included(route: Route) -> None:
    call = route.call(TEST_SERVICE + "Unary", Cardinality.UNARY_UNARY)
    request = Message(
        payload=b"x",
        headers={"h-text": b"head", "h-bin": b"\x00\xc3\xa9"},
        trailers={"t-text": b"tail", "t-bin": b"\x01\xc3\xa9"},
    )
    async with asyncio.timeout(TEST_TIMEOUT), call:
        await call.send_message(request, end=True)
        reply = await call.recv_message()
    assert reply is not None
    assert call.initial_metadata is not None and call.trailing_metadata is not None
    assert (call.initial_metadata["h-text"], call.initial_metadata["h-bin"]) == (
        "head",
        b"\x00\xc3\xa9",
    )
    assert (call.trailing_metadata["t-text"], call.trailing_metadata["t-bin"]) == (
        "tail",
        b"\x01\xc3\xa9",
    )


@pytest.mark.parametrize("kind", ["grpclib", "reverse"])
async def test_hop_by_hop_and_dropped_headers_are_not_forwarded(kind: str) -> None:
    def proxy(channel: grpclib.client.Channel) -> tunnel.Proxy:
        return tunnel.Proxy(channel, drop_metadata=["Authorization"])

    async with open_route(kind, proxy=proxy) as route:
        stub = bp.TestServiceStub(route.channel)
        extra = {"authorization": "Bearer secret", "keep-alive": "5", "x-kept": "yes"}
        async with asyncio.timeout(TEST_TIMEOUT):
            reply = await stub.unary(Message(), metadata=route.md(extra))
    assert reply.headers["x-kept"] == b"yes"
    assert "authorization" not in reply.headers
    assert "keep-alive" not in reply.headers


async def test_metadata_a_tunnel_cannot_carry_fails_the_call_with_a_status() -> None:
    """A binary value that is not UTF-8 cannot enter the reverse tunnel."""
    async with open_route("reverse") as route:
        stub = bp.TestServiceStub(route.channel)
        with pytest.raises(GRPCError) as failed:
            async with asyncio.timeout(TEST_TIMEOUT):
                await stub.unary(Message(), metadata=route.md({"x-bin": b"\xff\xfe"}))
    assert failed.value.status is Status.INVALID_ARGUMENT
    assert "x-bin" in (failed.value.message or "")


# -- deadlines -------------------------------------------------------------------------


async def deadline_seen(route: Route, timeout: float | None) -> float | None:
    call = route.call(Probe.PREFIX + "Deadline", Cardinality.UNARY_UNARY, timeout=timeout)
    async with asyncio.timeout(TEST_TIMEOUT), call:
        await call.send_message(Message(), end=True)
        await call.recv_message()
    (seen,) = route.probe.deadlines
    return seen


async def test_the_deadline_reaches_the_backend(route: Route) -> None:
    seen = await deadline_seen(route, 20.0)
    assert seen is not None and 10.0 < seen <= 20.0


async def test_no_deadline_is_invented(route: Route) -> None:
    assert await deadline_seen(route, None) is None


async def test_a_deadline_that_passes_cancels_the_backend_handler(route: Route) -> None:
    call = route.call(Probe.PREFIX + "Block", Cardinality.STREAM_STREAM, timeout=1.0)
    with pytest.raises((TimeoutError, GRPCError)) as failed:
        async with asyncio.timeout(TEST_TIMEOUT), call:
            await call.send_message(Message())
            await call.recv_message()
    if isinstance(failed.value, GRPCError):
        assert failed.value.status is Status.DEADLINE_EXCEEDED
    async with asyncio.timeout(PROMPT):
        await route.probe.cancelled.wait()


# -- cancellation ----------------------------------------------------------------------


async def test_the_caller_cancelling_cancels_the_backend_handler(route: Route) -> None:
    call = route.call(Probe.PREFIX + "Block", Cardinality.STREAM_STREAM)
    async with asyncio.timeout(TEST_TIMEOUT), call:
        await call.send_message(Message())
        await route.probe.started.wait()
        await call.cancel()
    async with asyncio.timeout(PROMPT):
        await route.probe.cancelled.wait()


async def test_a_caller_that_goes_away_cancels_the_backend_handler(route: Route) -> None:
    class Gone(Exception):
        pass

    call = route.call(Probe.PREFIX + "Block", Cardinality.STREAM_STREAM)
    with pytest.raises(Gone):
        async with asyncio.timeout(TEST_TIMEOUT), call:
            await call.send_message(Message())
            await route.probe.started.wait()
            raise Gone
    async with asyncio.timeout(PROMPT):
        await route.probe.cancelled.wait()


class _CallerSideBreaks:
    """A fallback whose caller's stream fails on its second read.

    Stands for what can go wrong on the caller's side of a proxied call
    without grpclib or the tunnel cancelling the handler (a message the
    proxy's process cannot read, say).
    """

    def __init__(self, channel: grpclib.client.Channel) -> None:
        self._proxy = tunnel.Proxy(channel)

    async def __call__(self, method_name: str, stream: Any) -> None:
        breaking = cast("grpclib.server.Stream[Any, Any]", _BreaksOnSecondRead(stream))
        await self._proxy(method_name, breaking)


class _BreaksOnSecondRead:
    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self._reads = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)

    async def recv_message(self) -> Any:
        self._reads += 1
        if self._reads == 2:
            raise RuntimeError("the caller's side broke")
        return await self._stream.recv_message()


@pytest.mark.parametrize("kind", PROXIED)
async def test_a_failure_of_the_callers_side_ends_the_call_while_the_backend_blocks(
    kind: str,
) -> None:
    async with open_route(kind, proxy=_CallerSideBreaks) as route:  # type: ignore[arg-type]
        call = route.call(Probe.PREFIX + "Block", Cardinality.STREAM_STREAM)
        with pytest.raises(GRPCError) as failed:
            async with asyncio.timeout(PROMPT), call:
                await call.send_message(Message())
                await call.recv_message()
        async with asyncio.timeout(PROMPT):
            await route.probe.cancelled.wait()
    # The proxy's handler raised: its server says so, as for any handler.
    assert failed.value.status is Status.UNKNOWN


@pytest.mark.parametrize("kind", ROUTES)
async def test_the_backend_ending_the_call_reaches_a_caller_still_sending(kind: str) -> None:
    async with open_route(kind) as route:
        call = route.call(Probe.PREFIX + "EndEarly", Cardinality.STREAM_STREAM)
        with pytest.raises(GRPCError) as failed:
            async with asyncio.timeout(PROMPT), call:
                await call.send_message(Message())
                # Never ends its side; reads until the status stops it.
                while await call.recv_message() is not None:
                    pass
                await call.send_message(Message())
    assert (failed.value.status, failed.value.message) == (Status.ABORTED, "enough")
    if isinstance(route.channel, tunnel.TunnelChannel):
        # A tunnel's caller, unlike grpclib's, keeps the trailers of a call
        # the server failed while it was still sending: they made it through.
        assert call.trailing_metadata is not None
        assert call.trailing_metadata["why"] == "because"


async def test_the_device_going_away_ends_both_halves_of_a_proxied_call() -> None:
    """The caller gets a status at once, and the device's call to its backend is cancelled."""
    async with open_route("reverse") as route:
        assert route.device is not None
        call = route.call(Probe.PREFIX + "Block", Cardinality.STREAM_STREAM)
        with pytest.raises(GRPCError) as failed:
            async with asyncio.timeout(TEST_TIMEOUT), call:
                await call.send_message(Message())
                await route.probe.started.wait()
                route.device.close()
                async with asyncio.timeout(PROMPT):
                    await call.recv_message()
        async with asyncio.timeout(PROMPT):
            await route.probe.cancelled.wait()
    # The device going away is not the caller's cancel.
    assert failed.value.status is Status.UNAVAILABLE


# -- statuses --------------------------------------------------------------------------


def error_request(code: Status, details: list[any_pb2.Any]) -> test_pb2.Message:
    request = test_pb2.Message(code=code.value, payload=b"x")
    request.trailers["t-text"] = b"why"
    request.trailers["t-bin"] = b"\x00\xc3\xa9"
    for detail in details:
        request.error_details.add().CopyFrom(detail)
    return request


def unknown_detail() -> any_pb2.Any:
    """A detail of a type this process has never imported."""
    return any_pb2.Any(
        type_url="type.googleapis.com/example.nobody.KnowsThis", value=b"\x0a\x03abc\x10\x07"
    )


def known_detail() -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(error_details_pb2.ErrorInfo(reason="QUOTA", domain="example.com"))
    return packed


async def failed_call(
    channel: grpclib.client.Channel, request: test_pb2.Message, metadata: Any
) -> tuple[GRPCError, MultiDict[Any] | None]:
    call = channel.request(
        TEST_SERVICE + "Unary",
        Cardinality.UNARY_UNARY,
        test_pb2.Message,
        test_pb2.Message,
        metadata=metadata,
    )
    with pytest.raises(GRPCError) as failed:
        async with asyncio.timeout(TEST_TIMEOUT), call:
            await call.send_message(request, end=True)
            await call.recv_message()
    return failed.value, call.trailing_metadata


@pytest.mark.parametrize("kind", PROXIED)
async def test_status_details_pass_through_byte_for_byte(kind: str) -> None:
    request = error_request(Status.RESOURCE_EXHAUSTED, [unknown_detail(), known_detail()])
    raw = tunnel.RawStatusDetailsCodec()
    async with open_route("direct", status_details_codec=raw) as direct:
        expected, _ = await failed_call(direct.channel, request, direct.metadata)
    async with open_route(kind, status_details_codec=raw) as route:
        got, trailers = await failed_call(route.channel, request, route.metadata)
    assert isinstance(expected.details, tunnel.RawStatusDetails)
    assert (got.status, got.message) == (Status.RESOURCE_EXHAUSTED, "error")
    assert got.details == expected.details
    status = status_pb2.Status.FromString(got.details.data)
    assert [d.type_url for d in status.details] == [
        "type.googleapis.com/example.nobody.KnowsThis",
        "type.googleapis.com/google.rpc.ErrorInfo",
    ]
    assert status.details[0].value == b"\x0a\x03abc\x10\x07"
    assert trailers is not None
    assert (trailers["t-text"], trailers["t-bin"]) == ("why", b"\x00\xc3\xa9")


async def test_status_details_decode_at_the_caller_as_sent(route: Route) -> None:
    """The caller's ordinary codec decodes what the backend sent; the proxy never did."""
    request = error_request(Status.FAILED_PRECONDITION, [known_detail(), unknown_detail()])
    got, _ = await failed_call(route.channel, request, route.metadata)
    assert got.status is Status.FAILED_PRECONDITION
    assert got.details[0] == error_details_pb2.ErrorInfo(reason="QUOTA", domain="example.com")
    assert repr(got.details[1]) == "Unknown('example.nobody.KnowsThis')"


@pytest.mark.parametrize("code", [Status.NOT_FOUND, Status.PERMISSION_DENIED, Status.INTERNAL])
async def test_status_and_message_unchanged(route: Route, code: Status) -> None:
    got, trailers = await failed_call(route.channel, error_request(code, []), route.metadata)
    assert (got.status, got.message, got.details) == (code, "error", None)
    assert trailers is not None and trailers["t-text"] == "why"


async def test_an_unknown_method_is_answered_by_the_backend(route: Route) -> None:
    """The proxy forwards what it does not know; the backend refuses it."""
    call = route.call("/no.such.Service/Method", Cardinality.UNARY_UNARY)
    with pytest.raises(GRPCError) as failed:
        async with asyncio.timeout(TEST_TIMEOUT), call:
            await call.send_message(Message(), end=True)
            await call.recv_message()
    # grpclib's server answers UNIMPLEMENTED without a content-type, which
    # grpclib's client reports as UNKNOWN (GRPCLIB-NOTES 3.2); the proxy
    # passes on what its client saw.
    assert failed.value.status in (Status.UNIMPLEMENTED, Status.UNKNOWN)
