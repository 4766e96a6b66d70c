"""A wire-compatible Python implementation of ``grpchantesting.TestService``.

The Go reference tests every tunnel with grpchan's ``grpchantesting.TestServer``
(shared/INTEROP.md, "Behaviour of grpchantesting.TestServer"). This module
implements the same behaviour so that a Python server can stand in for the Go
one and so that our conformance suite (:mod:`tunnel.testing.conformance`) can
compare a tunneled call with a direct grpclib call against one implementation.

Why a raw-stream service and not a betterproto ``TestServiceBase`` subclass:
betterproto handlers see only request messages, but the contract needs the
incoming request metadata (echoed back in ``Message.headers``) and control
over response headers and trailers. So each method here takes the
``grpclib.server.Stream`` itself, exactly like grpclib's own health service.

Go's ``grpc.SetHeader``/``SetTrailer`` only *record* metadata; grpc-go sends
the headers with the first response message, or, if the call ends without a
message, as a separate header frame when there are any (else the status goes
out as a trailers-only response). :class:`_Reply` reproduces that ordering on
grpclib, so a direct grpclib client and a tunneled client observe the same
initial metadata, trailing metadata and status.

Deliberate differences from the Go server, all forced by grpclib:

- ``delay_millis`` sleeps are cancellable. grpclib cancels a handler when the
  call's deadline passes or the client resets the stream; a handler that
  ignored that would outlive its call. (Go sleeps through it; the client sees
  ``DEADLINE_EXCEEDED`` either way.)
- The echoed ``headers`` map holds the request metadata grpclib exposes in
  ``stream.metadata``: grpclib drops ``:authority``, ``content-type``,
  ``user-agent``, ``te`` and ``grpc-*`` keys, which grpc-go would include.
- Error details: grpclib's ``ProtoStatusDetailsCodec`` re-packs each detail
  with ``Any.Pack``, so it needs real google-protobuf messages and always
  writes the ``type.googleapis.com/`` prefix. See :func:`detail_message`.
- A ``code`` that is not a valid gRPC status code is reported as
  ``UNKNOWN`` (grpclib cannot send any other number; a grpclib client would
  turn it into ``UNKNOWN`` anyway).
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping
from typing import Protocol, TypeAlias

import grpclib.const
import grpclib.server
from betterproto.lib.google.protobuf import Empty
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory, wrappers_pb2
from google.protobuf import message as pb_message
from google.rpc import error_details_pb2
from grpclib.const import Cardinality, Status
from multidict import MultiDict

from tunnel.testing._pb.grpchantesting import Message

__all__ = ["SERVICE_NAME", "AnyLike", "TestService", "detail_message", "echoed_metadata"]

SERVICE_NAME = "grpchantesting.TestService"

_MetadataValue: TypeAlias = str | bytes
_MessageStream: TypeAlias = "grpclib.server.Stream[Message, Message]"

# Imported for their side effect: they register google.rpc.ErrorInfo & co. and
# the wrapper types in the default descriptor pool, so that the error details
# clients send most often resolve to their concrete classes.
_REGISTERED_DETAIL_TYPES = (error_details_pb2, wrappers_pb2)


class AnyLike(Protocol):
    """What is read from a ``google.protobuf.Any``: betterproto's or upb's."""

    type_url: str
    value: bytes


def echoed_metadata(metadata: Mapping[str, _MetadataValue] | None) -> dict[str, bytes]:
    """Turn request metadata into the ``headers`` map a response echoes back.

    The contract keeps the *last* value of each key (grpchan's ``asMap``);
    iterating the multidict in order and overwriting does exactly that.
    Text values are UTF-8 encoded, ``-bin`` values are already bytes.
    """
    result: dict[str, bytes] = {}
    if metadata is None:
        return result
    for key, value in metadata.items():
        result[key] = value.encode("utf-8") if isinstance(value, str) else value
    return result


def _metadata_from_map(values: Mapping[str, bytes]) -> MultiDict[_MetadataValue]:
    """Build response metadata from a request's ``headers``/``trailers`` map.

    Go's ``metadata.New`` lower-cases keys. grpclib wants ``bytes`` for
    ``-bin`` keys and ``str`` for the others; a text value that is not valid
    UTF-8 (or not printable ASCII, which grpclib checks when sending) makes
    the call fail with ``UNKNOWN``, as any handler exception does.
    """
    result: MultiDict[_MetadataValue] = MultiDict()
    for raw_key, raw_value in values.items():
        key = raw_key.lower()
        result.add(key, raw_value if key.endswith("-bin") else raw_value.decode("utf-8"))
    return result


# Classes for detail types nobody registered, keyed by full type name. They
# live in a private pool so they can never clash with (or shadow) a real
# definition that is imported later into the default pool.
_opaque_pool = descriptor_pool.DescriptorPool()
_opaque_classes: dict[str, type[pb_message.Message]] = {}


def _opaque_class(type_name: str) -> type[pb_message.Message]:
    """A field-less message class whose full name is *type_name*.

    Parsing bytes into it keeps every field as an unknown field, and
    serializing writes them back unchanged, so the detail survives grpclib's
    ``Any.Pack`` with its type name and payload intact.
    """
    cls = _opaque_classes.get(type_name)
    if cls is None:
        package, _, name = type_name.rpartition(".")
        file_proto = descriptor_pb2.FileDescriptorProto(
            name=f"tunnel/testing/opaque/{type_name}.proto",
            package=package,
            syntax="proto3",
        )
        file_proto.message_type.add(name=name)
        _opaque_pool.Add(file_proto)
        descriptor = _opaque_pool.FindMessageTypeByName(type_name)
        cls = message_factory.GetMessageClass(descriptor)
        _opaque_classes[type_name] = cls
    return cls


def detail_message(detail: AnyLike) -> pb_message.Message:
    """Convert one ``error_details`` entry into what grpclib can send.

    grpclib's ``ProtoStatusDetailsCodec.encode`` calls ``Any.Pack(detail)``
    for every detail, which needs a google-protobuf message and derives the
    type URL as ``type.googleapis.com/`` + the message's full name. Handing
    it the request's ``Any`` itself would wrap it a second time (type URL
    ``.../google.protobuf.Any``), which no client expects. So:

    - a type registered in the default descriptor pool (``google.rpc.*``
      details, wrapper types, anything the process imported) is parsed into
      its concrete class, which a grpclib client can also decode;
    - an unregistered type is parsed into a field-less class of the same full
      name (:func:`_opaque_class`), which round-trips the type name and the
      payload bytes (a grpclib client then reports it as ``Unknown(name)``);
    - only if neither works (malformed type URL or payload) is the ``Any``
      kept as is, accepting the double wrapping rather than dropping it.

    A non-default type URL prefix cannot survive grpclib: it always becomes
    ``type.googleapis.com/``.
    """
    type_name = detail.type_url.rpartition("/")[2]
    try:
        try:
            descriptor = descriptor_pool.Default().FindMessageTypeByName(type_name)
            cls = message_factory.GetMessageClass(descriptor)
        except KeyError:
            cls = _opaque_class(type_name)
        result = cls()
        result.ParseFromString(detail.value)
    except Exception:
        return any_pb2.Any(type_url=detail.type_url, value=detail.value)
    return result


class _Reply:
    """Response side of one call with grpc-go's header/trailer semantics.

    Invariants: headers go out at most once, before the first message or
    with the final status; the final status goes out exactly once, last.
    """

    def __init__(self, stream: _MessageStream) -> None:
        self._stream = stream
        self._headers: MultiDict[_MetadataValue] = MultiDict()
        self._headers_sent = False

    def set_headers(self, values: Mapping[str, bytes]) -> None:
        """Record headers to send with the first message (``grpc.SetHeader``)."""
        self._headers = _metadata_from_map(values)

    async def _flush_headers(self) -> None:
        if not self._headers_sent:
            self._headers_sent = True
            await self._stream.send_initial_metadata(metadata=self._headers)

    async def send(self, reply: Message) -> None:
        await self._flush_headers()
        await self._stream.send_message(reply)

    async def finish(self, last: Message | None) -> None:
        """End the call with the trailers and status *last* asks for.

        *last* is the request message whose ``trailers``/``code``/
        ``error_details`` decide the outcome; ``None`` means OK with no
        trailers (a bidi call that received nothing).
        """
        if not self._headers_sent and self._headers:
            # grpc-go: recorded headers go out as their own frame, so the
            # client sees them as initial metadata, not merged into trailers.
            await self._flush_headers()
        if last is None or last.code == 0:
            await self._stream.send_trailing_metadata(
                metadata=_metadata_from_map(last.trailers) if last is not None else None
            )
            return
        try:
            status = Status(last.code)
        except ValueError:
            status = Status.UNKNOWN
        details = [detail_message(d) for d in last.error_details]
        await self._stream.send_trailing_metadata(
            status=status,
            status_message="error",
            status_details=details or None,
            metadata=_metadata_from_map(last.trailers),
        )


async def _delay(request: Message) -> None:
    if request.delay_millis > 0:
        await asyncio.sleep(request.delay_millis / 1000)


async def _recv_one(stream: _MessageStream) -> Message:
    """The single request message of a unary-request call."""
    request = await stream.recv_message()
    if request is None:
        raise grpclib.GRPCError(Status.INTERNAL, "missing request message")
    return request


class TestService:
    """``grpchantesting.TestService`` served from raw grpclib streams.

    Register it like any grpclib service: ``grpclib.server.Server([TestService()])``,
    or inside a tunnel with ``tunnel.TunnelServiceHandler([TestService()])``.
    It keeps no state between calls, so one instance can serve any number of
    servers and concurrent calls.
    """

    __test__ = False  # not a pytest test class, despite the name

    async def unary(self, stream: _MessageStream) -> None:
        request = await _recv_one(stream)
        await _delay(request)
        reply = _Reply(stream)
        reply.set_headers(request.headers)
        if request.code == 0:
            await reply.send(
                Message(headers=echoed_metadata(stream.metadata), payload=request.payload)
            )
        await reply.finish(request)

    async def client_stream(self, stream: _MessageStream) -> None:
        last: Message | None = None
        count = 0
        async for request in stream:
            last = request
            count += 1
            if request.code != 0:
                break
        if last is None:
            last = Message()
        await _delay(last)
        reply = _Reply(stream)
        reply.set_headers(last.headers)
        if last.code == 0:
            await reply.send(
                Message(
                    headers=echoed_metadata(stream.metadata),
                    payload=last.payload,
                    count=count,
                )
            )
        await reply.finish(last)

    async def server_stream(self, stream: _MessageStream) -> None:
        request = await _recv_one(stream)
        await _delay(request)
        reply = _Reply(stream)
        reply.set_headers(request.headers)
        echoed = echoed_metadata(stream.metadata)
        for _ in range(request.count):
            await reply.send(Message(headers=echoed, payload=request.payload))
        await reply.finish(request)

    async def bidi_stream(self, stream: _MessageStream) -> None:
        echoed = echoed_metadata(stream.metadata)
        reply = _Reply(stream)
        last: Message | None = None
        count = 0
        half_duplex = False
        buffered: list[Message] = []
        async for request in stream:
            last = request
            await _delay(request)
            if count == 0:
                reply.set_headers(request.headers)
                # Half duplex: read the whole request stream before replying,
                # which tests a tunnel that must buffer in one direction.
                half_duplex = request.count < 0
            count += 1
            if request.code != 0:
                break
            response = Message(headers=echoed, payload=request.payload, count=count)
            if half_duplex:
                buffered.append(response)
            else:
                await reply.send(response)
        for response in buffered:
            await reply.send(response)
        await reply.finish(last)

    async def use_external_message_twice(self, stream: grpclib.server.Stream[Empty, Empty]) -> None:
        await stream.recv_message()
        await stream.send_message(Empty())

    def __mapping__(self) -> dict[str, grpclib.const.Handler]:
        prefix = f"/{SERVICE_NAME}/"
        return {
            prefix + "Unary": grpclib.const.Handler(
                self.unary, Cardinality.UNARY_UNARY, Message, Message
            ),
            prefix + "ClientStream": grpclib.const.Handler(
                self.client_stream, Cardinality.STREAM_UNARY, Message, Message
            ),
            prefix + "ServerStream": grpclib.const.Handler(
                self.server_stream, Cardinality.UNARY_STREAM, Message, Message
            ),
            prefix + "BidiStream": grpclib.const.Handler(
                self.bidi_stream, Cardinality.STREAM_STREAM, Message, Message
            ),
            prefix + "UseExternalMessageTwice": grpclib.const.Handler(
                self.use_external_message_twice, Cardinality.UNARY_UNARY, Empty, Empty
            ),
        }
