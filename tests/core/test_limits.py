"""Bounds a peer cannot push past: concurrent streams, and what piles up unsent.

* ``max_concurrent_streams``: a ``new_stream`` beyond the limit is refused at
  once (RESOURCE_EXHAUSTED, no handler event), and counts as used; room
  frees as streams end.
* The backlog: frames queued by the peer's own actions (refusals, window
  updates, the last frames of finished streams) are counted, so the driver
  can stop reading while the peer is not reading what we send.
* Window updates queue one per chunk, as the reference's do, until the
  control queue is long (the peer is not reading); then each stream's
  queued update grows instead of another one queuing.
"""

from __future__ import annotations

from grpclib.const import Status

from tests.core.helpers import (
    BIDI,
    UNARY,
    cancel,
    drain_server,
    half_close,
    kinds,
    negotiated_server,
    new_stream,
    opened,
    request,
)
from tunnel._core.connection import COALESCE_AT
from tunnel._core.events import StreamOpened


def test_streams_beyond_the_limit_are_refused_before_any_handler() -> None:
    server = negotiated_server(max_concurrent_streams=2)
    assert isinstance(opened(server.receive_frame(new_stream(1))), StreamOpened)
    assert isinstance(opened(server.receive_frame(new_stream(2))), StreamOpened)
    assert server.receive_frame(new_stream(3)) == []  # no StreamOpened: no handler runs
    (refusal,) = drain_server(server)
    assert refusal.stream_id == 3
    assert refusal.close_stream.status.code == Status.RESOURCE_EXHAUSTED.value
    assert "limit is 2" in refusal.close_stream.status.message
    # The refused stream counts as used: its later frames are ignored.
    assert server.receive_frame(request(3, b"late")) == []
    assert server.active_streams == 2


def test_room_frees_as_streams_end() -> None:
    server = negotiated_server(max_concurrent_streams=2)
    server.receive_frame(new_stream(1))
    server.receive_frame(new_stream(2))
    server.close_stream(1, None)  # the handler of stream 1 returned
    assert isinstance(opened(server.receive_frame(new_stream(3))), StreamOpened)
    server.receive_frame(cancel(2))  # the client cancelled stream 2
    assert isinstance(opened(server.receive_frame(new_stream(4))), StreamOpened)
    assert server.receive_frame(new_stream(5)) == []
    assert server.active_streams == 2


def test_refused_and_finished_streams_count_in_the_backlog_until_written() -> None:
    server = negotiated_server(max_concurrent_streams=1)
    server.receive_frame(new_stream(1, UNARY))
    for stream_id in range(2, 12):
        server.receive_frame(new_stream(stream_id))  # ten refusals
    server.receive_frame(request(1, b"x"))
    server.receive_frame(half_close(1))
    server.send_message(1, b"reply")
    server.close_stream(1, None)
    assert server.backlog() == 11  # ten refusals, one finished stream's frames
    frames = drain_server(server)
    assert server.backlog() == 0
    assert [k for _, k in kinds(frames)].count("close_stream") == 11


def test_window_updates_coalesce_only_when_the_peer_is_not_reading() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(request(1, b"a" * 10))
    server.acknowledge(1, 4)
    server.acknowledge(1, 6)
    # Quiet queue: one update per chunk, as the reference sends them.
    assert [f.window_update for f in drain_server(server)] == [4, 6]

    for stream_id in range(2, COALESCE_AT + 3):
        server.receive_frame(new_stream(stream_id, "/nobody/Home"))  # refusals pile up
    server.receive_frame(request(1, b"b" * 100))
    for _ in range(100):
        server.acknowledge(1, 1)
    frames = drain_server(server)
    updates = [f.window_update for f in frames if f.WhichOneof("frame") == "window_update"]
    assert sum(updates) == 100  # the sum is right
    assert len(updates) < 100  # but not one frame per byte
