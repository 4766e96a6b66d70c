"""Handler failures reach the caller as they would over plain grpclib.

Each case runs over a direct grpclib channel (the control group) and over a
tunnel to the same handlers; the caller must observe the same outcome.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from google.rpc import error_details_pb2
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    FLOW_CONTROL,
    TEST_TIMEOUT,
    Probe,
    connected,
    fc_id,
    options,
    probe_call,
    serving,
    tunnel_over,
)
from tunnel.testing._pb.grpchantesting import Message

ServerStream = grpclib.server.Stream[Message, Message]

BAD_REQUEST = error_details_pb2.BadRequest(
    field_violations=[
        error_details_pb2.BadRequest.FieldViolation(field="payload", description="too short")
    ]
)


async def raises_plain(stream: ServerStream) -> None:
    await stream.recv_message()
    raise ValueError("a bug in the handler")


async def raises_not_implemented(stream: ServerStream) -> None:
    await stream.recv_message()
    raise NotImplementedError


async def returns_nothing(stream: ServerStream) -> None:
    await stream.recv_message()


async def raises_grpc_error(stream: ServerStream) -> None:
    await stream.recv_message()
    raise GRPCError(Status.FAILED_PRECONDITION, "not now", [BAD_REQUEST])


async def replies_then_fails(stream: ServerStream) -> None:
    await stream.recv_message()
    await stream.send_message(Message(payload=b"one"))
    raise GRPCError(Status.ABORTED, "aborted half-way")


async def cancels(stream: ServerStream) -> None:
    await stream.recv_message()
    await stream.cancel()


PROBE = Probe(
    RaisesPlain=(Cardinality.UNARY_UNARY, raises_plain),
    RaisesNotImplemented=(Cardinality.UNARY_UNARY, raises_not_implemented),
    ReturnsNothing=(Cardinality.UNARY_UNARY, returns_nothing),
    RaisesGrpcError=(Cardinality.UNARY_UNARY, raises_grpc_error),
    RepliesThenFails=(Cardinality.UNARY_STREAM, replies_then_fails),
    FailsWhileClientSends=(Cardinality.STREAM_STREAM, raises_grpc_error),
    ClientStreamFails=(Cardinality.STREAM_UNARY, raises_grpc_error),
)


@dataclass(frozen=True)
class Outcome:
    replies: tuple[bytes, ...]
    error: str | None
    status: Status | None = None
    message: str | None = None
    details: tuple[bytes, ...] = ()


def outcome_of(replies: list[Message], exc: BaseException | None) -> Outcome:
    payloads = tuple(r.payload for r in replies)
    if exc is None:
        return Outcome(payloads, None)
    if isinstance(exc, GRPCError):
        details = tuple(d.SerializeToString() for d in exc.details or ())
        return Outcome(payloads, "GRPCError", exc.status, exc.message, details)
    return Outcome(payloads, type(exc).__name__)


async def unary(channel: grpclib.client.Channel, name: str) -> Outcome:
    replies: list[Message] = []
    try:
        async with probe_call(channel, name, Cardinality.UNARY_UNARY) as stream:
            await stream.send_message(Message(payload=b"req"))
            reply = await stream.recv_message()
            if reply is not None:
                replies.append(reply)
    except Exception as exc:
        return outcome_of(replies, exc)
    return outcome_of(replies, None)


async def server_streaming(channel: grpclib.client.Channel, name: str) -> Outcome:
    replies: list[Message] = []
    try:
        async with probe_call(channel, name, Cardinality.UNARY_STREAM) as stream:
            await stream.send_message(Message(payload=b"req"))
            async for reply in stream:
                replies.append(reply)
    except Exception as exc:
        return outcome_of(replies, exc)
    return outcome_of(replies, None)


async def still_sending(channel: grpclib.client.Channel, name: str) -> Outcome:
    """The handler fails while the caller has not ended its side."""
    cardinality = {
        "FailsWhileClientSends": Cardinality.STREAM_STREAM,
        "ClientStreamFails": Cardinality.STREAM_UNARY,
    }[name]
    replies: list[Message] = []
    try:
        async with probe_call(channel, name, cardinality) as stream:
            await stream.send_message(Message(payload=b"req"))
            async for reply in stream:
                replies.append(reply)
    except Exception as exc:
        return outcome_of(replies, exc)
    return outcome_of(replies, None)


Runner = Callable[[grpclib.client.Channel, str], Awaitable[Outcome]]

CASES: list[tuple[str, Runner, Outcome]] = [
    (
        "RaisesPlain",
        unary,
        Outcome((), "GRPCError", Status.UNKNOWN, "Internal Server Error"),
    ),
    (
        "RaisesNotImplemented",
        unary,
        Outcome((), "GRPCError", Status.UNKNOWN, "Internal Server Error"),
    ),
    (
        "ReturnsNothing",
        unary,
        Outcome((), "GRPCError", Status.UNKNOWN, "Internal Server Error"),
    ),
    (
        "RaisesGrpcError",
        unary,
        Outcome(
            (),
            "GRPCError",
            Status.FAILED_PRECONDITION,
            "not now",
            (BAD_REQUEST.SerializeToString(),),
        ),
    ),
    (
        "RepliesThenFails",
        server_streaming,
        Outcome((b"one",), "GRPCError", Status.ABORTED, "aborted half-way"),
    ),
    (
        "FailsWhileClientSends",
        still_sending,
        Outcome(
            (),
            "GRPCError",
            Status.FAILED_PRECONDITION,
            "not now",
            (BAD_REQUEST.SerializeToString(),),
        ),
    ),
    (
        "ClientStreamFails",
        still_sending,
        Outcome(
            (),
            "GRPCError",
            Status.FAILED_PRECONDITION,
            "not now",
            (BAD_REQUEST.SerializeToString(),),
        ),
    ),
]


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
@pytest.mark.parametrize(("name", "run", "expected"), CASES, ids=[c[0] for c in CASES])
async def test_handler_failure_as_with_grpclib(
    name: str, run: Runner, expected: Outcome, disable_fc: bool
) -> None:
    opts = options(disable_flow_control=disable_fc)
    handlers: list[Any] = [PROBE, tunnel.TunnelServiceHandler([PROBE], options=opts)]
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving(handlers) as served,
        connected(served.port) as direct,
        tunnel_over(served.port, opts=opts) as tunneled,
    ):
        assert await run(direct, name) == expected
        assert await run(tunneled, name) == expected
        # The tunnel lives on.
        assert await run(tunneled, name) == expected
        assert tunneled.error is None and not tunneled.closed
