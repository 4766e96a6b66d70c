"""Conformance cases for ``grpchantesting.TestService``, runnable over any channel.

Each case makes one kind of call (or a short sequence of calls) through a
``grpclib.client.Channel`` and returns a :class:`CaseResult`: a frozen,
comparable record of what the *caller* observed -- reply payloads, the
request metadata the service echoed back, response headers and trailers,
status code, message and details, or how else the call ended. Nothing in a
result depends on the transport, so the same case run over a plain grpclib
connection and over a tunnel must give equal results; that is how our own
test-suite uses it (direct grpclib is the control group).

Each case also has a *check*, which raises :class:`AssertionError` naming
every field that differs from what the grpchantesting contract
(shared/INTEROP.md) says a caller must see. So a user can point the cases at
their own deployment of the test service, tunneled or not::

    async with tunnel.open_tunnel(channel) as tunnel_channel:
        results = await run_conformance(tunnel_channel)
    verify_conformance(results)           # raises AssertionError listing failures

Normalisations, and why:

- Only the application's metadata is recorded: pseudo-headers, ``grpc-*``,
  ``content-type``, ``user-agent`` and ``te`` depend on the transport (grpclib
  hides them, grpc-go shows some), and keys are sorted (a tunnel carries
  metadata in a protobuf map, whose order is not kept; the order of values of
  one key is kept).
- A call that ran out of time is recorded as ``error="deadline"`` whether the
  caller saw grpclib's local ``asyncio.TimeoutError`` or the server's
  ``DEADLINE_EXCEEDED`` status: both deadlines expire at nearly the same time,
  and which one wins is a race (GRPCLIB-NOTES 2.3).
- Error details are recorded as type URL + deterministic serialization of
  what the client decoded. grpclib's status-details codec decodes only types
  known to the client process; others become ``Unknown(name)`` and are
  recorded with ``value=None``.

Binary (``-bin``) metadata values in these cases are valid UTF-8 on purpose:
the grpctunnel wire protocol carries them raw in protobuf ``string`` fields,
so only such values interoperate with the Go reference (PROTOCOL.md,
"Metadata").
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TypeAlias

import grpclib.client
from betterproto.lib.google.protobuf import Any as AnyMessage
from betterproto.lib.google.protobuf import Empty
from google.protobuf import message as pb_message
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from tunnel.testing._pb.grpchantesting import Message, TestServiceStub

__all__ = [
    "CASES",
    "Case",
    "CaseResult",
    "Detail",
    "Reply",
    "run_case",
    "run_conformance",
    "verify_conformance",
]

MetadataPairs: TypeAlias = tuple[tuple[str, str | bytes], ...]

_METHOD_PREFIX = "/grpchantesting.TestService/"
_TRANSPORT_KEYS = frozenset({"content-type", "user-agent", "te"})
_TYPE_URL_PREFIX = "type.googleapis.com/"

#: How long one case may take before it is recorded as a hang.
DEFAULT_CASE_TIMEOUT = 10.0


def _is_application_key(key: str) -> bool:
    return not (key.startswith((":", "grpc-")) or key in _TRANSPORT_KEYS)


def _application_pairs(
    metadata: Iterable[tuple[str, str | bytes]],
) -> MetadataPairs:
    # sorted() is stable: values of one key keep their order.
    return tuple(
        sorted(((k, v) for k, v in metadata if _is_application_key(k)), key=lambda kv: kv[0])
    )


def _observed_metadata(
    metadata: Mapping[str, str | bytes] | None,
) -> MetadataPairs | None:
    return None if metadata is None else _application_pairs(metadata.items())


# -- results --------------------------------------------------------------------------


@dataclass(frozen=True, repr=False)
class Reply:
    """One response message as the caller saw it.

    ``headers`` is the request metadata the service echoed back (its
    ``Message.headers`` map), application keys only, sorted.
    """

    payload: bytes = b""
    count: int = 0
    headers: tuple[tuple[str, bytes], ...] = ()

    @classmethod
    def of(cls, message: Message) -> Reply:
        headers = tuple(
            sorted((k, v) for k, v in message.headers.items() if _is_application_key(k))
        )
        return cls(payload=message.payload, count=message.count, headers=headers)

    def __repr__(self) -> str:
        # A 1 MiB payload in an assertion message helps nobody; equality still
        # compares the real bytes.
        if len(self.payload) > 64:
            digest = hashlib.sha256(self.payload).hexdigest()[:16]
            payload = f"<{len(self.payload)} bytes, sha256 {digest}...>"
        else:
            payload = repr(self.payload)
        return f"Reply(payload={payload}, count={self.count}, headers={self.headers!r})"


@dataclass(frozen=True)
class Detail:
    """One error detail: its type URL and serialized value.

    ``value`` is ``None`` when the client could not decode the detail's type.
    """

    type_url: str
    value: bytes | None

    @classmethod
    def of(cls, detail: object) -> Detail:
        if isinstance(detail, pb_message.Message):
            return cls(
                _TYPE_URL_PREFIX + detail.DESCRIPTOR.full_name,
                detail.SerializeToString(deterministic=True),
            )
        # grpclib's ProtoStatusDetailsCodec yields `_Unknown` objects holding
        # only the type name for types it could not resolve.
        name = getattr(detail, "_name", None)
        if isinstance(name, str):
            return cls(_TYPE_URL_PREFIX + name, None)
        return cls(f"<{type(detail).__qualname__}>", None)


@dataclass(frozen=True)
class CaseResult:
    """What a caller observed from one case; equal results mean equal behaviour.

    - ``replies``: the response messages received, in order (for a call that
      failed part-way, those received before the failure).
    - ``status``, ``status_message``, ``details``: the gRPC status the call
      ended with (``Status.OK`` on success), or ``None`` when it ended
      otherwise (see ``error``).
    - ``initial_metadata``, ``trailing_metadata``: response headers and
      trailers, application keys only; ``None`` when the case did not look
      (generated stubs do not expose them).
    - ``error``: ``"deadline"`` (local timeout or ``DEADLINE_EXCEEDED``),
      ``"cancelled"`` (the case cancelled the call), ``"hang"`` (no outcome
      within the case timeout), or the qualified type name of any other
      exception.
    - ``follow_up``: the result of a call made afterwards on the same channel.
    """

    replies: tuple[Reply, ...] = ()
    status: Status | None = Status.OK
    status_message: str | None = None
    details: tuple[Detail, ...] = ()
    initial_metadata: MetadataPairs | None = None
    trailing_metadata: MetadataPairs | None = None
    error: str | None = None
    follow_up: CaseResult | None = None


def _ended(
    replies: Iterable[Message],
    failure: BaseException | None,
    *,
    initial_metadata: Mapping[str, str | bytes] | None = None,
    trailing_metadata: Mapping[str, str | bytes] | None = None,
    observe_metadata: bool = False,
) -> CaseResult:
    """Build the result of a call that received *replies* and ended with *failure*."""
    status: Status | None = Status.OK
    message: str | None = None
    details: tuple[Detail, ...] = ()
    error: str | None = None
    if isinstance(failure, GRPCError) and failure.status is not Status.DEADLINE_EXCEEDED:
        status = failure.status
        message = failure.message
        details = tuple(Detail.of(d) for d in failure.details or ())
    elif isinstance(failure, GRPCError | TimeoutError):
        status, error = None, "deadline"
    elif isinstance(failure, asyncio.CancelledError):
        status, error = None, "cancelled"
    elif failure is not None:
        status = None
        error = f"{type(failure).__module__}.{type(failure).__qualname__}"
    return CaseResult(
        replies=tuple(Reply.of(r) for r in replies),
        status=status,
        status_message=message,
        details=details,
        initial_metadata=_observed_metadata(initial_metadata) if observe_metadata else None,
        trailing_metadata=_observed_metadata(trailing_metadata) if observe_metadata else None,
        error=error,
    )


# -- call helpers ---------------------------------------------------------------------


async def _raw_call(
    channel: grpclib.client.Channel,
    method: str,
    cardinality: Cardinality,
    requests: Sequence[Message],
    *,
    metadata: Sequence[tuple[str, str | bytes]] | None = None,
) -> CaseResult:
    """Make a call on a raw grpclib stream, recording headers and trailers too.

    The trailers are awaited explicitly: when a server sends headers and then
    an error, grpclib's ``recv_message`` returns ``None`` and only
    ``recv_trailing_metadata`` raises the status.
    """
    replies: list[Message] = []
    stream = channel.request(
        _METHOD_PREFIX + method, cardinality, Message, Message, metadata=metadata
    )
    failure: Exception | None = None
    try:
        async with stream:
            if not requests:
                await stream.send_request(end=True)
            for index, request in enumerate(requests):
                await stream.send_message(request, end=index == len(requests) - 1)
            async for reply in stream:
                replies.append(reply)
            await stream.recv_trailing_metadata()
    except Exception as exc:
        failure = exc
    return _ended(
        replies,
        failure,
        initial_metadata=stream.initial_metadata,
        trailing_metadata=stream.trailing_metadata,
        observe_metadata=True,
    )


async def _stub_unary(
    channel: grpclib.client.Channel,
    request: Message,
    *,
    timeout: float | None = None,
    metadata: Sequence[tuple[str, str | bytes]] | None = None,
) -> CaseResult:
    try:
        reply = await TestServiceStub(channel).unary(request, timeout=timeout, metadata=metadata)
    except Exception as exc:
        return _ended((), exc)
    return _ended((reply,), None)


async def _stub_client_stream(
    channel: grpclib.client.Channel, requests: Sequence[Message]
) -> CaseResult:
    try:
        reply = await TestServiceStub(channel).client_stream(requests)
    except Exception as exc:
        return _ended((), exc)
    return _ended((reply,), None)


async def _stub_server_stream(channel: grpclib.client.Channel, request: Message) -> CaseResult:
    replies: list[Message] = []
    try:
        async for reply in TestServiceStub(channel).server_stream(request):
            replies.append(reply)
    except Exception as exc:
        return _ended(replies, exc)
    return _ended(replies, None)


async def _stub_bidi(channel: grpclib.client.Channel, requests: Sequence[Message]) -> CaseResult:
    replies: list[Message] = []
    try:
        async for reply in TestServiceStub(channel).bidi_stream(requests):
            replies.append(reply)
    except Exception as exc:
        return _ended(replies, exc)
    return _ended(replies, None)


def _any(detail: pb_message.Message) -> AnyMessage:
    return AnyMessage(
        type_url=_TYPE_URL_PREFIX + detail.DESCRIPTOR.full_name,
        value=detail.SerializeToString(deterministic=True),
    )


# -- the cases ------------------------------------------------------------------------

# A -bin value with a NUL, high bytes and a two-byte UTF-8 sequence; valid
# UTF-8 so that it can cross a grpctunnel (see the module docstring).
_BINARY_VALUE = b"\x00\x01\x7f caf\xc3\xa9"
_ERROR_INFO = error_details_pb2.ErrorInfo(
    reason="TEST_REASON", domain="tunnel.example", metadata={"key": "value"}
)
_STRING_VALUE = wrappers_pb2.StringValue(value="more details")
_LARGE_PAYLOAD = bytes(range(256)) * 4096  # 1 MiB
_HALF_DUPLEX_PAYLOAD = b"\x00\x01\x02\x03" * 10_000  # 40 KB: 5 of them exceed a 64 KiB window


async def unary_metadata(channel: grpclib.client.Channel) -> CaseResult:
    """Unary call with request metadata: a multi-valued key and a ``-bin`` key."""
    return await _stub_unary(
        channel,
        Message(payload=b"unary payload"),
        metadata=[
            ("x-multi", "first"),
            ("x-plain", "plain value"),
            ("x-multi", "second"),
            ("x-token-bin", _BINARY_VALUE),
        ],
    )


def check_unary_metadata(result: CaseResult) -> None:
    """The reply echoes the payload and the *last* value of each request key."""
    headers = (
        ("x-multi", b"second"),
        ("x-plain", b"plain value"),
        ("x-token-bin", _BINARY_VALUE),
    )
    _require(result, CaseResult(replies=(Reply(b"unary payload", 0, headers),)))


async def unary_error_details(channel: grpclib.client.Channel) -> CaseResult:
    """Unary call failing with code 9, two details, a header and a trailer."""
    request = Message(
        code=Status.FAILED_PRECONDITION.value,
        headers={"x-error-header": b"header value"},
        trailers={"x-error-trailer": b"trailer value"},
        error_details=[_any(_ERROR_INFO), _any(_STRING_VALUE)],
    )
    return await _raw_call(channel, "Unary", Cardinality.UNARY_UNARY, [request])


def check_unary_error_details(result: CaseResult) -> None:
    """Status 9 ``"error"`` with both details in order; headers and trailers still arrive."""
    _require(
        result,
        CaseResult(
            status=Status.FAILED_PRECONDITION,
            status_message="error",
            details=(Detail.of(_ERROR_INFO), Detail.of(_STRING_VALUE)),
            initial_metadata=(("x-error-header", "header value"),),
            trailing_metadata=(("x-error-trailer", "trailer value"),),
        ),
    )


async def unary_headers_trailers(channel: grpclib.client.Channel) -> CaseResult:
    """Unary call asking for response headers and trailers, one trailer ``-bin``."""
    request = Message(
        payload=b"with metadata",
        headers={"x-header-one": b"one", "X-Header-Two": b"two"},
        trailers={"x-trailer": b"three", "x-trailer-bin": _BINARY_VALUE},
    )
    return await _raw_call(channel, "Unary", Cardinality.UNARY_UNARY, [request])


def check_unary_headers_trailers(result: CaseResult) -> None:
    """Headers and trailers arrive as asked, keys lower-cased, ``-bin`` as bytes."""
    _require(
        result,
        CaseResult(
            replies=(Reply(b"with metadata"),),
            initial_metadata=(("x-header-one", "one"), ("x-header-two", "two")),
            trailing_metadata=(("x-trailer", "three"), ("x-trailer-bin", _BINARY_VALUE)),
        ),
    )


async def client_stream(channel: grpclib.client.Channel) -> CaseResult:
    """Client-streaming call with five messages."""
    return await _stub_client_stream(
        channel, [Message(payload=f"client {i}".encode()) for i in range(5)]
    )


def check_client_stream(result: CaseResult) -> None:
    """One reply: the last payload and the number of messages received."""
    _require(result, CaseResult(replies=(Reply(b"client 4", 5),)))


async def client_stream_empty(channel: grpclib.client.Channel) -> CaseResult:
    """Client-streaming call that sends no message at all."""
    return await _stub_client_stream(channel, [])


def check_client_stream_empty(result: CaseResult) -> None:
    """One empty reply with count 0."""
    _require(result, CaseResult(replies=(Reply(b"", 0),)))


async def server_stream(channel: grpclib.client.Channel) -> CaseResult:
    """Server-streaming call asking for five messages."""
    return await _stub_server_stream(channel, Message(payload=b"streamed", count=5))


def check_server_stream(result: CaseResult) -> None:
    """Five replies with the request's payload."""
    _require(result, CaseResult(replies=(Reply(b"streamed"),) * 5))


async def server_stream_empty(channel: grpclib.client.Channel) -> CaseResult:
    """Server-streaming call asking for no message, but for headers and trailers."""
    request = Message(count=0, headers={"x-header": b"h"}, trailers={"x-trailer": b"t"})
    return await _raw_call(channel, "ServerStream", Cardinality.UNARY_STREAM, [request])


def check_server_stream_empty(result: CaseResult) -> None:
    """No reply, status OK, and headers still arrive as headers (not in trailers)."""
    _require(
        result,
        CaseResult(
            initial_metadata=(("x-header", "h"),),
            trailing_metadata=(("x-trailer", "t"),),
        ),
    )


async def server_stream_error(channel: grpclib.client.Channel) -> CaseResult:
    """Server-streaming call that fails after three messages."""
    request = Message(
        payload=b"before error",
        count=3,
        code=Status.ABORTED.value,
        trailers={"x-trailer": b"after error"},
    )
    return await _raw_call(channel, "ServerStream", Cardinality.UNARY_STREAM, [request])


def check_server_stream_error(result: CaseResult) -> None:
    """Three replies, then status ABORTED ``"error"`` with the trailer."""
    _require(
        result,
        CaseResult(
            replies=(Reply(b"before error"),) * 3,
            status=Status.ABORTED,
            status_message="error",
            initial_metadata=(),
            trailing_metadata=(("x-trailer", "after error"),),
        ),
    )


async def client_stream_error(channel: grpclib.client.Channel) -> CaseResult:
    """Client-streaming call whose last message asks for an error."""
    requests = [
        Message(payload=b"fine"),
        Message(payload=b"fine too"),
        Message(
            code=Status.NOT_FOUND.value,
            headers={"x-header": b"from the failing message"},
            trailers={"x-trailer": b"also"},
        ),
    ]
    # A raw stream sends the last message and the half-close together; with a
    # stub's separate end() the server's reset could race the half-close.
    return await _raw_call(channel, "ClientStream", Cardinality.STREAM_UNARY, requests)


def check_client_stream_error(result: CaseResult) -> None:
    """Status NOT_FOUND ``"error"``, headers and trailers from the failing message."""
    _require(
        result,
        CaseResult(
            status=Status.NOT_FOUND,
            status_message="error",
            initial_metadata=(("x-header", "from the failing message"),),
            trailing_metadata=(("x-trailer", "also"),),
        ),
    )


async def bidi_error(channel: grpclib.client.Channel) -> CaseResult:
    """Bidi call: one message answered, then one that asks for an error."""
    replies: list[Message] = []
    stream = channel.request(
        _METHOD_PREFIX + "BidiStream", Cardinality.STREAM_STREAM, Message, Message
    )
    failure: Exception | None = None
    try:
        async with stream:
            await stream.send_message(Message(payload=b"answered"))
            reply = await stream.recv_message()
            if reply is not None:
                replies.append(reply)
            await stream.send_message(
                Message(code=Status.PERMISSION_DENIED.value, trailers={"x-trailer": b"t"}),
                end=True,
            )
            async for reply in stream:
                replies.append(reply)
            await stream.recv_trailing_metadata()
    except Exception as exc:
        failure = exc
    return _ended(
        replies,
        failure,
        initial_metadata=stream.initial_metadata,
        trailing_metadata=stream.trailing_metadata,
        observe_metadata=True,
    )


def check_bidi_error(result: CaseResult) -> None:
    """One reply, then status PERMISSION_DENIED ``"error"`` with the last message's trailer."""
    _require(
        result,
        CaseResult(
            replies=(Reply(b"answered", 1),),
            status=Status.PERMISSION_DENIED,
            status_message="error",
            initial_metadata=(),
            trailing_metadata=(("x-trailer", "t"),),
        ),
    )


async def bidi_ping_pong(channel: grpclib.client.Channel) -> CaseResult:
    """Bidi call sending five messages, each only after the previous reply arrived."""
    replies: list[Message] = []
    stream = channel.request(
        _METHOD_PREFIX + "BidiStream", Cardinality.STREAM_STREAM, Message, Message
    )
    failure: Exception | None = None
    try:
        async with stream:
            for i in range(5):
                await stream.send_message(
                    Message(
                        payload=f"ping {i}".encode(),
                        headers={"x-bidi-header": b"from first"} if i == 0 else {},
                        trailers={"x-bidi-trailer": b"from last"} if i == 4 else {},
                    )
                )
                reply = await stream.recv_message()
                if reply is None:
                    break
                replies.append(reply)
            await stream.end()
            async for reply in stream:
                replies.append(reply)
            await stream.recv_trailing_metadata()
    except Exception as exc:
        failure = exc
    return _ended(
        replies,
        failure,
        initial_metadata=stream.initial_metadata,
        trailing_metadata=stream.trailing_metadata,
        observe_metadata=True,
    )


def check_bidi_ping_pong(result: CaseResult) -> None:
    """Five replies counted 1..5; headers from the first message, trailers from the last."""
    _require(
        result,
        CaseResult(
            replies=tuple(Reply(f"ping {i}".encode(), i + 1) for i in range(5)),
            initial_metadata=(("x-bidi-header", "from first"),),
            trailing_metadata=(("x-bidi-trailer", "from last"),),
        ),
    )


async def bidi_half_duplex(channel: grpclib.client.Channel) -> CaseResult:
    """Bidi call in half-duplex mode (first count < 0): replies only after half-close.

    The five 40 KB requests exceed a 64 KiB flow-control window, so the call
    only completes if the transport lets the client send while it reads nothing.
    """
    requests = [Message(payload=_HALF_DUPLEX_PAYLOAD + bytes([i]), count=-1) for i in range(5)]
    return await _stub_bidi(channel, requests)


def check_bidi_half_duplex(result: CaseResult) -> None:
    """Five replies counted 1..5, payloads in order."""
    _require(
        result,
        CaseResult(
            replies=tuple(Reply(_HALF_DUPLEX_PAYLOAD + bytes([i]), i + 1) for i in range(5))
        ),
    )


async def large_unary(channel: grpclib.client.Channel) -> CaseResult:
    """Unary call with a 1 MiB payload each way."""
    return await _stub_unary(channel, Message(payload=_LARGE_PAYLOAD))


def check_large_unary(result: CaseResult) -> None:
    """The 1 MiB payload comes back intact."""
    _require(result, CaseResult(replies=(Reply(_LARGE_PAYLOAD),)))


async def unknown_method(channel: grpclib.client.Channel) -> CaseResult:
    """Call to a method the service does not have."""
    return await _raw_call(channel, "NoSuchMethod", Cardinality.UNARY_UNARY, [Message()])


def check_unknown_method(result: CaseResult) -> None:
    """Status UNIMPLEMENTED (the message is the server's own wording).

    A plain grpclib server fails this check: its "method not found" answer
    carries no content-type, so a grpclib client reports
    ``UNKNOWN 'Missing content-type header'`` instead (GRPCLIB-NOTES 3.2).
    """
    _require(result, CaseResult(status=Status.UNIMPLEMENTED), fields=("replies", "status", "error"))


async def deadline_exceeded(channel: grpclib.client.Channel) -> CaseResult:
    """Unary call whose handler sleeps 1 s while the caller allows 0.2 s."""
    return await _stub_unary(channel, Message(delay_millis=1000), timeout=0.2)


def check_deadline_exceeded(result: CaseResult) -> None:
    """The call ends with its deadline (timeout or DEADLINE_EXCEEDED), no reply."""
    _require(result, CaseResult(status=None, error="deadline"))


async def cancel_bidi(channel: grpclib.client.Channel) -> CaseResult:
    """Cancel the task of a bidi call mid-stream, then make another call on the channel."""
    replies: list[Message] = []
    first_reply = asyncio.Event()

    async def call() -> None:
        stream = channel.request(
            _METHOD_PREFIX + "BidiStream", Cardinality.STREAM_STREAM, Message, Message
        )
        async with stream:
            await stream.send_message(Message(payload=b"before cancel"))
            reply = await stream.recv_message()
            if reply is not None:
                replies.append(reply)
            first_reply.set()
            # The service answers each message at once and waits for the
            # next: this blocks until the call is cancelled.
            await stream.recv_message()

    task = asyncio.create_task(call())
    failure: BaseException | None = None
    waiter = asyncio.create_task(first_reply.wait())
    try:
        await asyncio.wait({task, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        waiter.cancel()
        task.cancel()
        try:
            await task
        except BaseException as exc:
            failure = exc
        await asyncio.gather(waiter, return_exceptions=True)
    current = asyncio.current_task()
    if isinstance(failure, asyncio.CancelledError) and current is not None and current.cancelling():
        # Our own caller cancelled us (e.g. the case timeout): do not swallow it.
        raise failure
    follow_up = await _stub_unary(channel, Message(payload=b"after cancel"))
    return dataclasses.replace(_ended(replies, failure), follow_up=follow_up)


def check_cancel_bidi(result: CaseResult) -> None:
    """The first reply arrives, the call ends as cancelled, and the channel still works."""
    _require(
        result,
        CaseResult(
            replies=(Reply(b"before cancel", 1),),
            status=None,
            error="cancelled",
            follow_up=CaseResult(replies=(Reply(b"after cancel"),)),
        ),
    )


async def use_external_message_twice(channel: grpclib.client.Channel) -> CaseResult:
    """Unary call whose request and response types come from another proto file."""
    try:
        await TestServiceStub(channel).use_external_message_twice(Empty())
    except Exception as exc:
        return _ended((), exc)
    return _ended((), None)


def check_use_external_message_twice(result: CaseResult) -> None:
    """Status OK."""
    _require(result, CaseResult())


# -- running and checking -------------------------------------------------------------


@dataclass(frozen=True)
class Case:
    """One conformance case: how to run it and what the contract says about it."""

    name: str
    run: Callable[[grpclib.client.Channel], Awaitable[CaseResult]]
    check: Callable[[CaseResult], None]

    @property
    def description(self) -> str:
        return (self.run.__doc__ or self.name).strip().splitlines()[0]


def _require(
    result: CaseResult, expected: CaseResult, *, fields: Iterable[str] | None = None
) -> None:
    """Raise AssertionError naming every field of *result* that differs from *expected*."""
    names = [f.name for f in dataclasses.fields(CaseResult)] if fields is None else list(fields)
    problems = [
        f"{name}: got {getattr(result, name)!r}, expected {getattr(expected, name)!r}"
        for name in names
        if getattr(result, name) != getattr(expected, name)
    ]
    if problems:
        raise AssertionError("; ".join(problems))


CASES: tuple[Case, ...] = (
    Case("unary_metadata", unary_metadata, check_unary_metadata),
    Case("unary_error_details", unary_error_details, check_unary_error_details),
    Case("unary_headers_trailers", unary_headers_trailers, check_unary_headers_trailers),
    Case("client_stream", client_stream, check_client_stream),
    Case("client_stream_empty", client_stream_empty, check_client_stream_empty),
    Case("client_stream_error", client_stream_error, check_client_stream_error),
    Case("server_stream", server_stream, check_server_stream),
    Case("server_stream_empty", server_stream_empty, check_server_stream_empty),
    Case("server_stream_error", server_stream_error, check_server_stream_error),
    Case("bidi_ping_pong", bidi_ping_pong, check_bidi_ping_pong),
    Case("bidi_half_duplex", bidi_half_duplex, check_bidi_half_duplex),
    Case("bidi_error", bidi_error, check_bidi_error),
    Case("large_unary", large_unary, check_large_unary),
    Case("unknown_method", unknown_method, check_unknown_method),
    Case("deadline_exceeded", deadline_exceeded, check_deadline_exceeded),
    Case("cancel_bidi", cancel_bidi, check_cancel_bidi),
    Case(
        "use_external_message_twice", use_external_message_twice, check_use_external_message_twice
    ),
)


async def run_case(
    case: Case, channel: grpclib.client.Channel, *, timeout: float = DEFAULT_CASE_TIMEOUT
) -> CaseResult:
    """Run one case, recording ``error="hang"`` if it has no outcome within *timeout* s.

    The case runs in a task of its own: grpclib's deadline handling leaves the
    task it cancelled marked as cancelling, which would confuse the next case
    run in the same task.
    """

    async def run() -> CaseResult:
        try:
            async with asyncio.timeout(timeout):
                return await case.run(channel)
        except TimeoutError:
            return CaseResult(status=None, error="hang")

    return await asyncio.create_task(run(), name=f"conformance case {case.name}")


async def run_conformance(
    channel: grpclib.client.Channel, *, case_timeout: float = DEFAULT_CASE_TIMEOUT
) -> dict[str, CaseResult]:
    """Run every case in order on *channel*; return the results by case name."""
    return {case.name: await run_case(case, channel, timeout=case_timeout) for case in CASES}


def verify_conformance(results: Mapping[str, CaseResult]) -> None:
    """Check every result against the contract; raise one AssertionError listing all failures."""
    failures: list[str] = []
    for case in CASES:
        result = results.get(case.name)
        if result is None:
            failures.append(f"{case.name}: not run")
            continue
        try:
            case.check(result)
        except AssertionError as exc:
            failures.append(f"{case.name} ({case.description}): {exc}")
    if failures:
        raise AssertionError("conformance failures:\n" + "\n".join(failures))
