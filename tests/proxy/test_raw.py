"""``tunnel.raw``: bytes in, the same bytes out, whatever they hold."""

from __future__ import annotations

from google.rpc import error_details_pb2, status_pb2
from grpclib.const import Status
from grpclib.encoding.proto import ProtoStatusDetailsCodec

from tunnel.raw import RawMessage, RawStatusDetails, RawStatusDetailsCodec


def test_raw_status_details_round_trip_unchanged() -> None:
    status = status_pb2.Status(code=Status.ABORTED.value, message="m")
    status.details.add(type_url="example.com/custom.prefix/Type", value=b"\xff\x00")
    data = status.SerializeToString()
    codec = RawStatusDetailsCodec()
    details = codec.decode(Status.ABORTED, "m", data)
    assert details == RawStatusDetails(data)
    # Even a type URL prefix grpclib's Any.Pack would rewrite survives.
    assert codec.encode(Status.ABORTED, "m", details) == data


def test_other_details_are_encoded_as_the_inner_codec_does() -> None:
    details = [error_details_pb2.ErrorInfo(reason="R")]
    expected = ProtoStatusDetailsCodec().encode(Status.NOT_FOUND, "x", details)
    assert RawStatusDetailsCodec().encode(Status.NOT_FOUND, "x", details) == expected


def test_raw_message_compares_by_bytes() -> None:
    assert RawMessage(b"a") == RawMessage.FromString(b"a")
    assert RawMessage(b"a") != RawMessage(b"b")
    assert RawMessage(b"abc").SerializeToString(deterministic=True) == b"abc"
    assert repr(RawMessage(b"abc")) == "RawMessage(3 bytes)"
