"""How streams end: close_stream, cancel, and what the client sees."""

from __future__ import annotations

from grpclib.const import Status

from tunnel._core.events import StreamEnded, StreamReset
from tunnel._pb.tunnel_pb2 import ServerToClient

from .helpers import (
    BIDI,
    SERVER_STREAM,
    UNARY,
    Pair,
    cancel,
    drain_client,
    drain_server,
    ended,
    kinds,
    negotiated_server,
    new_stream,
    request,
    reset,
    status,
)


def close_frame(frames: list[ServerToClient]) -> ServerToClient:
    closes = [f for f in frames if f.HasField("close_stream")]
    assert len(closes) == 1, frames
    return closes[0]


# -- close -----------------------------------------------------------------------


def test_empty_headers_precede_close_when_the_app_sent_none() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1))
    server.close_stream(1, status(Status.NOT_FOUND, "nope"), [("x-t", "v")])
    frames = drain_server(server)
    assert kinds(frames) == [(1, "response_headers"), (1, "close_stream")]
    assert dict(frames[0].response_headers.md) == {}
    assert frames[1].close_stream.status.code == Status.NOT_FOUND.value
    assert list(frames[1].close_stream.response_trailers.md["x-t"].val) == ["v"]


def test_success_is_close_stream_without_status_field() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1))
    server.send_headers(1, [("x-h", "1")])
    server.close_stream(1, status(Status.OK, "ignored"))
    frames = drain_server(server)
    assert kinds(frames) == [(1, "response_headers"), (1, "close_stream")]
    assert not frames[1].close_stream.HasField("status")
    # Empty trailers are still written: the reference always sends them.
    assert frames[1].close_stream.HasField("response_trailers")


def test_close_reaches_the_client_with_status_and_trailers() -> None:
    pair = Pair()
    stream_id = pair.open(UNARY)
    pair.server.close_stream(stream_id, status(Status.ABORTED, "why"), [("x-t-bin", b"\x00\x01")])
    client_events, _ = pair.pump()
    event = ended(client_events)
    assert event.status is not None
    assert (event.status.code, event.status.message) == (Status.ABORTED.value, "why")
    assert event.trailers == (("x-t-bin", b"\x00\x01"),)
    assert not event.reset
    assert not pair.client.is_open(stream_id)


def test_ok_close_reaches_the_client_as_status_none() -> None:
    pair = Pair()
    stream_id = pair.open(UNARY)
    pair.server.close_stream(stream_id, None)
    client_events, _ = pair.pump()
    assert ended(client_events).status is None


def test_close_waits_behind_queued_response_data() -> None:
    pair = Pair()
    stream_id = pair.open(SERVER_STREAM)
    pair.server.send_message(stream_id, b"a" * 40_000)
    pair.server.close_stream(stream_id, None)
    client_events, _ = pair.pump()
    assert [type(e).__name__ for e in client_events][-1] == "StreamEnded"
    assert b"".join(e.data for e in client_events if hasattr(e, "data")) == b"a" * 40_000


# -- cancel ------------------------------------------------------------------------


def test_cancel_is_answered_with_close_stream_cancelled() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.server.send_headers(stream_id, ())
    pair.pump()
    pair.client.cancel(stream_id)
    _, server_events = pair.pump()
    assert reset(server_events) == StreamReset(
        stream_id=stream_id,
        code=Status.CANCELLED.value,
        message="stream cancelled by the tunnel client",
    )
    close = close_frame(pair.s2c)
    assert close.close_stream.status.code == Status.CANCELLED.value
    assert not pair.server.is_open(stream_id)
    # The client already ended the stream itself and ignores the answer.
    assert not any(isinstance(e, StreamEnded) for e in pair.client_events)


def test_cancel_drops_unsent_responses() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, SERVER_STREAM))
    server.receive_frame(request(1, b"q"))
    server.send_message(1, b"r" * 50_000)
    server.receive_frame(cancel(1))
    frames = drain_server(server)
    assert [k for _, k in kinds(frames)] == ["response_headers", "close_stream"]
    # Anything the handler still does on the stream is refused, not queued.
    assert not server.is_open(1)


def test_cancel_of_a_stream_without_headers_sends_empty_headers_first() -> None:
    # The reference does this (vectors/fwd_fc_deadline_client): only streams
    # refused at creation get a close_stream alone.
    server = negotiated_server()
    server.receive_frame(new_stream(1, UNARY))
    server.receive_frame(cancel(1))
    frames = drain_server(server)
    assert kinds(frames) == [(1, "response_headers"), (1, "close_stream")]
    assert frames[1].close_stream.status.code == Status.CANCELLED.value


def test_cancel_keeps_headers_the_app_queued_but_were_not_yet_sent() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.send_headers(1, [("x-h", "kept")])
    server.receive_frame(cancel(1))
    frames = drain_server(server)
    assert kinds(frames) == [(1, "response_headers"), (1, "close_stream")]
    assert list(frames[0].response_headers.md["x-h"].val) == ["kept"]


def test_cancel_before_new_stream_was_pulled_sends_nothing() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream(BIDI, (), pair.server._methods[BIDI])
    pair.client.send_message(stream_id, b"x")
    pair.client.cancel(stream_id)
    assert drain_client(pair.client) == []
    assert not pair.client.is_open(stream_id)
    # ... and the stream does not linger in the client's table.
    assert stream_id not in pair.client._streams
    # The next stream's id is above it; the server simply never saw the first.
    next_id = pair.open(BIDI)
    assert next_id == stream_id + 1
    assert pair.server.is_open(next_id)


def test_cancel_after_new_stream_was_pulled_sends_cancel_only() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.client.send_message(stream_id, b"unsent")
    pair.client.cancel(stream_id)
    assert kinds(drain_client(pair.client)) == [(stream_id, "cancel")]


def test_cancel_of_a_finished_stream_is_a_no_op() -> None:
    pair = Pair()
    stream_id = pair.open(UNARY)
    pair.server.close_stream(stream_id, None)
    pair.pump()
    pair.client.cancel(stream_id)
    assert drain_client(pair.client) == []


def test_cancel_of_a_closed_stream_with_blocked_responses_frees_it() -> None:
    # The handler finished (close queued behind a response the flow-control
    # window holds back), then the client gave up: nothing will ever open the
    # window again, so the queued data must not be kept for the tunnel's life.
    server = negotiated_server()
    server.receive_frame(new_stream(1, SERVER_STREAM))
    server.receive_frame(request(1, b"q"))
    server.send_message(1, b"r" * 100_000)
    server.close_stream(1, None)
    sent = drain_server(server)
    assert sum(len(f.response_message.data) + len(f.more_response_data) for f in sent) == 65_536
    assert server.receive_frame(cancel(1)) == []
    rest = drain_server(server)
    assert [k for _, k in kinds(rest)] == ["close_stream"]
    assert server.buffered_message_bytes(1) == 0
    assert 1 not in server._streams
