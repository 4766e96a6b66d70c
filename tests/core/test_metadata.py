"""Metadata: what travels, how binary values travel, and what fails only a call."""

from __future__ import annotations

import pytest
from grpclib.const import Status
from grpclib.metadata import decode_timeout

from tunnel._core.events import HeadersReceived
from tunnel._core.metadata import MetadataError, encode_timeout_up

from .helpers import (
    BIDI,
    METHODS,
    UNARY,
    Pair,
    close,
    drain_client,
    drain_server,
    ended,
    negotiated_client,
    negotiated_server,
    new_stream,
    opened,
    response_headers,
    status,
)

RESERVED = [
    (":authority", "example"),
    (":path", "/x/y"),
    ("content-type", "application/grpc"),
    ("user-agent", "grpc-go/1.75.1"),
    ("te", "trailers"),
    ("grpc-status", "0"),
    ("grpc-message", "hi"),
    ("grpc-timeout", "1S"),
]


def test_reserved_headers_are_never_copied_into_new_stream() -> None:
    client = negotiated_client()
    client.open_stream(UNARY, [*RESERVED, ("x-app", "kept")], METHODS[UNARY])
    (frame,) = drain_client(client)
    assert dict(frame.new_stream.request_headers.md) == {
        "x-app": frame.new_stream.request_headers.md["x-app"]
    }
    assert list(frame.new_stream.request_headers.md["x-app"].val) == ["kept"]


def test_reserved_headers_are_never_copied_into_response_frames() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1))
    server.send_headers(1, [*RESERVED, ("x-h", "1")])
    server.close_stream(1, None, [*RESERVED, ("x-t", "2")])
    headers, closing = drain_server(server)
    assert set(headers.response_headers.md) == {"x-h"}
    assert set(closing.close_stream.response_trailers.md) == {"x-t"}


def test_reserved_headers_arriving_are_not_shown_to_the_app() -> None:
    server = negotiated_server()
    headers = {key: [value] for key, value in RESERVED if key != "grpc-timeout"}
    event = opened(server.receive_frame(new_stream(1, headers={**headers, "x-a": ["1"]})))
    assert event.metadata == (("x-a", "1"),)


def test_request_metadata_crosses_in_order_with_repeated_keys() -> None:
    pair = Pair()
    pair.open(UNARY, [("x-req-single", "alpha"), ("x-req-multi", "one"), ("x-req-multi", "two")])
    event = opened(pair.server_events)
    assert sorted(event.metadata) == [
        ("x-req-multi", "one"),
        ("x-req-multi", "two"),
        ("x-req-single", "alpha"),
    ]
    assert [v for k, v in event.metadata if k == "x-req-multi"] == ["one", "two"]


def test_binary_values_travel_raw_not_base64() -> None:
    client = negotiated_client()
    client.open_stream(UNARY, [("x-req-data-bin", b"\x00\x01\x02\x03")], METHODS[UNARY])
    (frame,) = drain_client(client)
    # The reference sends these bytes as a 4-character string.
    assert list(frame.new_stream.request_headers.md["x-req-data-bin"].val) == ["\x00\x01\x02\x03"]


def test_binary_values_arrive_as_bytes() -> None:
    pair = Pair()
    stream_id = pair.open(UNARY, [("x-req-data-bin", b"\x00\x01\x02\x03")])
    assert opened(pair.server_events).metadata == (("x-req-data-bin", b"\x00\x01\x02\x03"),)
    pair.server.send_headers(stream_id, [("x-h-bin", "\u00e9".encode())])
    pair.server.close_stream(stream_id, None, [("x-t-bin", b"\x7f")])
    client_events, _ = pair.pump()
    headers = client_events[0]
    assert isinstance(headers, HeadersReceived)
    assert headers.metadata == (("x-h-bin", b"\xc3\xa9"),)
    assert ended(client_events).trailers == (("x-t-bin", b"\x7f"),)


NOT_UTF8 = b"\xff\xfe\x00\x01"


def test_non_utf8_request_header_fails_only_that_call() -> None:
    pair = Pair()
    with pytest.raises(MetadataError, match="not valid UTF-8"):
        pair.client.open_stream(UNARY, [("x-raw-bin", NOT_UTF8)], METHODS[UNARY])
    assert drain_client(pair.client) == []
    # The tunnel and the next call are fine, and no id was used up.
    assert pair.open(UNARY) == 1


def test_non_utf8_response_header_raises_and_queues_nothing() -> None:
    pair = Pair()
    stream_id = pair.open(UNARY)
    with pytest.raises(MetadataError):
        pair.server.send_headers(stream_id, [("x-raw-bin", NOT_UTF8)])
    assert drain_server(pair.server) == []
    assert pair.server.is_open(stream_id)
    # The app fails the call instead; the client sees a status, the tunnel lives.
    pair.server.close_stream(stream_id, status(Status.INTERNAL, "bad header"))
    client_events, _ = pair.pump()
    end = ended(client_events)
    assert end.status is not None and end.status.code == Status.INTERNAL.value
    assert pair.open(UNARY) == stream_id + 1


def test_non_utf8_trailer_raises_and_the_stream_can_close_again() -> None:
    pair = Pair()
    stream_id = pair.open(UNARY)
    with pytest.raises(MetadataError):
        pair.server.close_stream(stream_id, None, [("x-raw-bin", NOT_UTF8)])
    assert drain_server(pair.server) == []
    pair.server.close_stream(stream_id, status(Status.INTERNAL, "bad trailer"))
    client_events, _ = pair.pump()
    end = ended(client_events)
    assert end.status is not None and end.status.code == Status.INTERNAL.value


def test_oversize_request_metadata_is_refused_on_send() -> None:
    client = negotiated_client(max_metadata_size=100)
    with pytest.raises(MetadataError, match="limit"):
        client.open_stream(UNARY, [("x-big", "v" * 200)], METHODS[UNARY])
    assert drain_client(client) == []


def test_oversize_request_headers_arriving_fail_the_stream_not_the_tunnel() -> None:
    server = negotiated_server(max_metadata_size=1_000)
    assert server.receive_frame(new_stream(1, headers={"x-big": ["v" * 5_000_000]})) == []
    (frame,) = drain_server(server)
    assert frame.close_stream.status.code == Status.INVALID_ARGUMENT.value
    assert opened(server.receive_frame(new_stream(2))).stream_id == 2


def test_many_small_headers_over_the_limit_fail_the_stream() -> None:
    server = negotiated_server(max_metadata_size=1_000)
    headers = {f"x-k{i}": ["v" * 10] for i in range(200)}
    assert server.receive_frame(new_stream(1, headers=headers)) == []
    (frame,) = drain_server(server)
    assert frame.close_stream.status.code == Status.INVALID_ARGUMENT.value


def test_oversize_response_headers_fail_the_stream_not_the_tunnel() -> None:
    client = negotiated_client(max_metadata_size=1_000)
    client.open_stream(BIDI, (), METHODS[BIDI])
    drain_client(client)
    event = ended(client.receive_frame(response_headers(1, {"x-big": ["v" * 100_000]})))
    assert event.reset
    assert event.status is not None and event.status.code == Status.INTERNAL.value
    assert client.open_stream(UNARY, (), METHODS[UNARY]) == 2


def test_oversize_trailers_end_the_stream_with_an_error() -> None:
    client = negotiated_client(max_metadata_size=1_000)
    client.open_stream(UNARY, (), METHODS[UNARY])
    drain_client(client)
    frame = close(1)
    frame.close_stream.response_trailers.md["x-big"].val.append("v" * 100_000)
    event = ended(client.receive_frame(frame))
    assert event.status is not None and event.status.code == Status.INTERNAL.value
    assert event.trailers == ()


def test_invalid_metadata_key_arriving_fails_the_stream() -> None:
    server = negotiated_server()
    assert server.receive_frame(new_stream(1, headers={"X-Upper": ["v"]})) == []
    (frame,) = drain_server(server)
    assert frame.close_stream.status.code == Status.INTERNAL.value
    assert "'X-Upper'" in frame.close_stream.status.message


# -- what no HTTP/2 peer could send -------------------------------------------------

BAD_KEYS = ["x-user\n", "x user", "x-ü", "", "x-a\r\nx-b", "x-null\x00"]
BAD_VALUES = ["a\r\nx-injected: 1", "a\x00", "tab\there", "\x7f", "caf\u00e9", "line\n"]
GOOD_VALUES = ["", " ", "printable ~!#$%&'()*+,-./:;<=>?@[\\]^_`{|}"]


@pytest.mark.parametrize("key", BAD_KEYS)
def test_request_header_key_no_http2_peer_could_send_fails_its_stream(key: str) -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(UNARY, (), METHODS[UNARY])
    frame = drain_client(pair.client)[0]
    frame.new_stream.request_headers.md[key].val.append("v")
    assert pair.server.receive_frame(frame) == []  # no StreamOpened: no handler runs
    pair.pump()
    event = ended(pair.client_events)
    assert event.status is not None and event.status.code == Status.INTERNAL.value
    assert repr(key) in event.status.message
    assert pair.open(UNARY) == stream_id + 1  # the tunnel lives on
    opened(pair.server_events)


@pytest.mark.parametrize("value", BAD_VALUES)
def test_request_header_value_no_http2_peer_could_send_fails_its_stream(value: str) -> None:
    server = negotiated_server()
    headers = {"x-ok": ["fine"], "x-bad": [value]}
    assert server.receive_frame(new_stream(1, headers=headers)) == []
    (frame,) = drain_server(server)
    assert frame.close_stream.status.code == Status.INTERNAL.value
    assert "'x-bad'" in frame.close_stream.status.message
    assert value not in frame.close_stream.status.message
    assert opened(server.receive_frame(new_stream(2))).stream_id == 2


@pytest.mark.parametrize("value", GOOD_VALUES)
def test_printable_ascii_and_empty_values_reach_the_handler(value: str) -> None:
    server = negotiated_server()
    event = opened(server.receive_frame(new_stream(1, headers={"x-v": [value]})))
    assert event.metadata == (("x-v", value),)


def test_binary_values_are_not_held_to_printable_ascii() -> None:
    server = negotiated_server()
    raw = "\r\n\x00\u00e9"
    event = opened(server.receive_frame(new_stream(1, headers={"x-raw-bin": [raw]})))
    assert event.metadata == (("x-raw-bin", raw.encode()),)


@pytest.mark.parametrize(("key", "value"), [("x-bad\n", "v"), ("x-ok", "a\r\nb: c")])
def test_response_headers_no_http2_peer_could_send_fail_the_call(key: str, value: str) -> None:
    client = negotiated_client()
    client.open_stream(BIDI, (), METHODS[BIDI])
    drain_client(client)
    event = ended(client.receive_frame(response_headers(1, {key: [value]})))
    assert event.reset
    assert event.status is not None and event.status.code == Status.INTERNAL.value
    assert repr(key) in event.status.message
    assert client.open_stream(UNARY, (), METHODS[UNARY]) == 2


@pytest.mark.parametrize(("key", "value"), [("x-bad\n", "v"), ("x-ok", "a\x00")])
def test_trailers_no_http2_peer_could_send_fail_the_call(key: str, value: str) -> None:
    client = negotiated_client()
    client.open_stream(UNARY, (), METHODS[UNARY])
    drain_client(client)
    client.receive_frame(response_headers(1))
    frame = close(1)
    frame.close_stream.response_trailers.md[key].val.append(value)
    event = ended(client.receive_frame(frame))
    assert event.status is not None and event.status.code == Status.INTERNAL.value
    assert repr(key) in event.status.message
    assert event.trailers == ()


# -- grpc-timeout ------------------------------------------------------------------


def test_timeout_travels_as_grpc_timeout_and_is_parsed() -> None:
    pair = Pair()
    pair.open(UNARY, timeout=0.25)
    assert list(pair.c2s[-1].new_stream.request_headers.md["grpc-timeout"].val) == ["250m"]
    event = opened(pair.server_events)
    assert event.timeout == pytest.approx(0.25)
    assert event.metadata == ()


@pytest.mark.parametrize(
    ("values", "seconds"),
    [(["250m"], 0.25), (["2S"], 2.0), (["1M"], 60.0), (["100u"], 1e-4), (["5S", "1S"], 1.0)],
)
def test_grpc_timeout_header_from_the_reference_is_parsed(
    values: list[str], seconds: float
) -> None:
    server = negotiated_server()
    event = opened(server.receive_frame(new_stream(1, headers={"grpc-timeout": values})))
    assert event.timeout == pytest.approx(seconds)


def test_no_grpc_timeout_means_no_deadline() -> None:
    server = negotiated_server()
    assert opened(server.receive_frame(new_stream(1))).timeout is None


def test_ill_formed_grpc_timeout_fails_the_stream() -> None:
    server = negotiated_server()
    assert server.receive_frame(new_stream(1, headers={"grpc-timeout": ["soon"]})) == []
    (frame,) = drain_server(server)
    assert frame.close_stream.status.code == Status.INVALID_ARGUMENT.value
    assert opened(server.receive_frame(new_stream(2)))


@pytest.mark.parametrize(
    "seconds", [0.0, 1e-9, 3.3e-6, 0.0099999, 0.0100001, 0.2999, 0.3, 1.23456, 9.9999, 10.5, 3600.2]
)
def test_timeouts_travel_rounded_up(seconds: float) -> None:
    """The server's deadline is never before the caller's (it races it otherwise)."""
    encoded = encode_timeout_up(seconds)
    decoded = decode_timeout(encoded)
    assert decoded >= seconds
    assert len(encoded) <= 9  # at most 8 digits and a unit, as gRPC allows
    unit = {"S": 1.0, "m": 1e-3, "u": 1e-6, "n": 1e-9}[encoded[-1]]
    assert decoded - seconds < unit


def test_absurd_timeouts_stay_within_eight_digits() -> None:
    assert encode_timeout_up(1e12) == "99999999S"
