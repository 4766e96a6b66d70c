"""The code that `make proto` generates imports side by side and agrees on the wire.

All three grpchantesting flavours are loaded into one process in the tests, and
the upb classes register their .proto files in protobuf's default descriptor
pool, which refuses two different files under one name.
"""

from google.protobuf import any_pb2, descriptor_pool

from tests.stubs.bp2 import grpchantesting as bp2
from tests.stubs.pb import test_grpc, test_pb2
from tunnel._pb import tunnel_pb2
from tunnel.testing._pb import grpchantesting as bp


def test_descriptor_pool_names() -> None:
    pool = descriptor_pool.Default()
    assert tunnel_pb2.DESCRIPTOR.name == "grpctunnel/v1/tunnel.proto"
    assert test_pb2.DESCRIPTOR.name == "grpchantesting/test.proto"
    assert pool.FindFileByName("grpchantesting/test.proto") is test_pb2.DESCRIPTOR
    assert pool.FindMessageTypeByName("grpchantesting.Message") is test_pb2.Message.DESCRIPTOR


def test_method_paths_agree() -> None:
    stub_paths = {
        "/grpchantesting.TestService/Unary",
        "/grpchantesting.TestService/ClientStream",
        "/grpchantesting.TestService/ServerStream",
        "/grpchantesting.TestService/BidiStream",
        "/grpchantesting.TestService/UseExternalMessageTwice",
    }
    service = test_pb2.DESCRIPTOR.services_by_name["TestService"]
    assert {f"/{service.full_name}/{m.name}" for m in service.methods} == stub_paths
    assert test_grpc.TestServiceBase.__abstractmethods__ == {m.name for m in service.methods}
    assert set(bp.TestServiceBase().__mapping__()) == stub_paths
    assert set(bp2.TestServiceBase().__mapping__()) == stub_paths


def test_message_round_trips_between_flavours() -> None:
    detail = any_pb2.Any(type_url="type.googleapis.com/x.Y", value=b"\x08\x01")
    upb = test_pb2.Message(
        payload=b"\x00\x01",
        count=3,
        code=5,
        delay_millis=7,
        headers={"h": b"1"},
        trailers={"t": b"2"},
        error_details=[detail],
    )
    wire = upb.SerializeToString()

    b7 = bp.Message().parse(wire)
    assert (b7.payload, b7.count, b7.code, b7.delay_millis) == (b"\x00\x01", 3, 5, 7)
    assert (b7.headers, b7.trailers) == ({"h": b"1"}, {"t": b"2"})
    assert [(d.type_url, d.value) for d in b7.error_details] == [(detail.type_url, detail.value)]

    b2 = bp2.Message.parse(wire)
    assert test_pb2.Message.FromString(bytes(b2)) == upb
    assert test_pb2.Message.FromString(bytes(b7)) == upb


def test_tunnel_frames_import() -> None:
    frame = tunnel_pb2.ClientToServer(stream_id=1)
    frame.half_close.SetInParent()
    assert frame.WhichOneof("frame") == "half_close"
