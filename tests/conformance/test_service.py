"""TestService behaviour that the conformance cases do not show on their own.

Mostly how error details survive grpclib's status-details codec, which
re-packs every detail itself (see ``tunnel.testing.service.detail_message``).
"""

from __future__ import annotations

import grpclib.client
from betterproto.lib.google.protobuf import Any as AnyMessage
from google.protobuf import any_pb2, wrappers_pb2
from google.rpc import error_details_pb2
from grpclib.const import Status

from tunnel.testing._pb import grpchantesting as pb
from tunnel.testing.conformance import Detail
from tunnel.testing.service import detail_message

UNREGISTERED_URL = "type.googleapis.com/example.v1.NotImportedAnywhere"
# field 1 varint 42, field 2 string "hi", field 99 fixed32: fields no class knows
UNREGISTERED_VALUE = b"\x08\x2a\x12\x02hi\x9d\x06\x01\x02\x03\x04"


def packed(detail: AnyMessage) -> any_pb2.Any:
    """What grpclib's ProtoStatusDetailsCodec puts on the wire for a detail."""
    container = any_pb2.Any()
    container.Pack(detail_message(detail))
    return container


def test_registered_detail_becomes_its_class() -> None:
    info = error_details_pb2.ErrorInfo(reason="R", domain="d")
    detail = AnyMessage(
        type_url="type.googleapis.com/google.rpc.ErrorInfo", value=info.SerializeToString()
    )
    assert detail_message(detail) == info
    assert packed(detail).type_url == detail.type_url


def test_unregistered_detail_keeps_type_name_and_bytes() -> None:
    container = packed(AnyMessage(type_url=UNREGISTERED_URL, value=UNREGISTERED_VALUE))
    assert (container.type_url, container.value) == (UNREGISTERED_URL, UNREGISTERED_VALUE)


def test_detail_type_url_prefix_becomes_the_googleapis_one() -> None:
    value = wrappers_pb2.Int32Value(value=7).SerializeToString()
    container = packed(AnyMessage(type_url="example.com/google.protobuf.Int32Value", value=value))
    assert (container.type_url, container.value) == (
        "type.googleapis.com/google.protobuf.Int32Value",
        value,
    )


def test_unparseable_detail_is_kept_wrapped_not_dropped() -> None:
    detail = AnyMessage(type_url=UNREGISTERED_URL + "Broken", value=b"\xff\xff")
    container = packed(detail)
    assert container.type_url == "type.googleapis.com/google.protobuf.Any"
    inner = any_pb2.Any()
    container.Unpack(inner)
    assert (inner.type_url, inner.value) == (detail.type_url, detail.value)


async def test_caller_sees_unregistered_detail_by_name(channel: grpclib.client.Channel) -> None:
    # grpclib's client codec can only name a type it cannot resolve.
    request = pb.Message(
        code=Status.DATA_LOSS.value,
        error_details=[AnyMessage(type_url=UNREGISTERED_URL, value=UNREGISTERED_VALUE)],
    )
    try:
        await pb.TestServiceStub(channel).unary(request)
    except grpclib.GRPCError as exc:
        assert exc.status is Status.DATA_LOSS
        assert [Detail.of(d) for d in exc.details] == [Detail(UNREGISTERED_URL, None)]
    else:
        raise AssertionError("the call succeeded")
