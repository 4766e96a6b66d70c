"""Fair scheduling of outgoing frames: round-robin by stream, control frames first."""

from __future__ import annotations

from .helpers import (
    BIDI,
    METHODS,
    Pair,
    client_window_update,
    drain_client,
    drain_server,
    kinds,
    negotiated_client,
    negotiated_server,
    new_stream,
    request,
)


def test_two_streams_with_big_messages_interleave_chunk_by_chunk() -> None:
    client = negotiated_client()
    a = client.open_stream(BIDI, (), METHODS[BIDI])
    b = client.open_stream(BIDI, (), METHODS[BIDI])
    client.send_message(a, b"a" * 60_000)
    client.send_message(b, b"b" * 60_000)
    data = [f.stream_id for f in drain_client(client) if not f.HasField("new_stream")]
    assert data == [a, b] * 4


def test_a_big_message_does_not_delay_a_small_one_by_more_than_a_chunk() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(new_stream(2, BIDI))
    server.send_message(1, b"x" * 60_000)
    server.send_message(2, b"small")
    server.close_stream(2, None)
    order = kinds(drain_server(server))
    # Stream 2's close goes out while stream 1 still has chunks to send.
    assert order.index((2, "close_stream")) < max(i for i, k in enumerate(order) if k[0] == 1)
    assert order[:4] == [
        (1, "response_headers"),
        (2, "response_headers"),
        (1, "response_message"),
        (2, "response_message"),
    ]


def test_control_frames_go_before_queued_data() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(request(1, b"x" * 100))
    server.send_message(1, b"y" * 50_000)
    server.acknowledge(1, 100)  # a window update, queued after the data
    server.receive_frame(new_stream(2, "/no.Such/Method"))  # a refusal, too
    order = kinds(drain_server(server))
    assert order[:2] == [(1, "window_update"), (2, "close_stream")]


def test_client_window_updates_overtake_its_requests() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.server.send_message(stream_id, b"r" * 10)
    pair.pump()
    pair.client.send_message(stream_id, b"q" * 40_000)
    pair.client.acknowledge(stream_id, 10)
    assert kinds(drain_client(pair.client))[0] == (stream_id, "window_update")


def test_a_blocked_stream_does_not_block_others() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI, window=10))
    server.receive_frame(new_stream(2, BIDI))
    server.send_message(1, b"x" * 100)
    server.send_message(2, b"y" * 100)
    server.close_stream(2, None)
    order = kinds(drain_server(server))
    assert (2, "close_stream") in order
    assert order.count((1, "more_response_data")) == 0
    server.receive_frame(client_window_update(1, 90))
    assert kinds(drain_server(server)) == [(1, "more_response_data")]
