"""Flow control (revision one): windows, window updates, and their abuse."""

from __future__ import annotations

from grpclib.const import Status

from tunnel._core import TunnelClientProtocol
from tunnel._core.events import DataReceived
from tunnel._core.flow import MAX_WINDOW
from tunnel._pb.tunnel_pb2 import REVISION_ZERO, ClientToServer, ServerToClient

from .helpers import (
    BIDI,
    METHODS,
    SERVER_STREAM,
    UNARY,
    Pair,
    client_window_update,
    data_of,
    drain_client,
    drain_server,
    ended,
    half_close,
    kinds,
    more_request,
    more_response,
    negotiated_client,
    negotiated_server,
    new_stream,
    request,
    reset,
    response,
    server_window_update,
    settings,
)


def sent_data(frames: list[ClientToServer] | list[ServerToClient]) -> int:
    total = 0
    for f in frames:
        kind = f.WhichOneof("frame")
        if kind in ("request_message", "response_message"):
            total += len(getattr(f, kind).data)
        elif kind in ("more_request_data", "more_response_data"):
            total += len(getattr(f, kind))
    return total


def window_updates(frames: list[ClientToServer] | list[ServerToClient]) -> list[int]:
    return [f.window_update for f in frames if f.WhichOneof("frame") == "window_update"]


# -- windows -----------------------------------------------------------------------


def test_client_send_window_starts_at_settings_initial_window() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    client.receive_frame(settings(0, 1, window=5_000))
    stream_id = client.open_stream(UNARY, (), METHODS[UNARY])
    client.send_message(stream_id, b"x" * 12_000)
    assert sent_data(drain_client(client)) == 5_000


def test_server_send_window_starts_at_new_stream_initial_window() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, SERVER_STREAM, window=7_000))
    server.receive_frame(request(1, b"q"))
    server.send_message(1, b"x" * 20_000)
    assert sent_data(drain_server(server)) == 7_000


def test_blocked_sender_resumes_on_window_update() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, SERVER_STREAM, window=1_000))
    server.receive_frame(request(1, b"q"))
    server.send_message(1, b"x" * 2_500)
    server.close_stream(1, None)
    assert sent_data(drain_server(server)) == 1_000
    assert not server.has_frames()
    server.receive_frame(client_window_update(1, 600))
    frames = drain_server(server)
    assert [len(f.more_response_data) for f in frames] == [600]
    server.receive_frame(client_window_update(1, 5_000))
    frames = drain_server(server)
    assert [k for _, k in kinds(frames)] == ["more_response_data", "close_stream"]
    assert len(frames[0].more_response_data) == 900


def test_client_blocked_sender_resumes_on_window_update() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    client.receive_frame(settings(0, 1, window=100))
    stream_id = client.open_stream(
        CLIENT_STREAM := "/test.Svc/ClientStream", (), METHODS[CLIENT_STREAM]
    )
    client.send_message(stream_id, b"x" * 250)
    client.half_close(stream_id)
    assert sent_data(drain_client(client)) == 100
    client.receive_frame(server_window_update(stream_id, 1_000))
    frames = drain_client(client)
    assert [k for _, k in kinds(frames)] == ["more_request_data", "half_close"]


def test_large_exchange_completes_with_app_acknowledging() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    payload = b"p" * 300_000
    pair.client.send_message(stream_id, payload)
    received = b""
    for _ in range(50):
        _, server_events = pair.pump()
        for e in server_events:
            if isinstance(e, DataReceived):
                received += e.data
                pair.server.acknowledge(stream_id, len(e.data))
        if len(received) == len(payload):
            break
    assert received == payload
    pair.pump()
    # Every byte consumed was given back, one update per chunk.
    assert sum(window_updates(pair.s2c)) == len(payload)
    assert max(window_updates(pair.s2c)) <= 16_384


def test_unacknowledged_data_never_exceeds_the_window() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.client.send_message(stream_id, b"p" * 300_000)
    _, server_events = pair.pump()
    assert len(data_of(server_events)) == 65_536
    assert pair.client.has_frames() is False


# -- window updates -------------------------------------------------------------


def test_window_update_only_when_the_app_acknowledges() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.client.send_message(stream_id, b"x" * 20_000)
    _, server_events = pair.pump()
    assert window_updates(pair.s2c) == []
    for e in server_events:
        assert isinstance(e, DataReceived)
        pair.server.acknowledge(stream_id, len(e.data))
    pair.pump()
    # One update per chunk the application consumed, of that chunk's size.
    assert window_updates(pair.s2c) == [16_384, 3_616]


def test_client_sends_window_update_when_its_app_acknowledges() -> None:
    pair = Pair()
    stream_id = pair.open(SERVER_STREAM)
    pair.client.send_message(stream_id, b"q")
    pair.pump()
    pair.server.send_message(stream_id, b"r" * 100)
    client_events, _ = pair.pump()
    assert window_updates(pair.c2s) == []
    pair.client.acknowledge(stream_id, len(data_of(client_events)))
    pair.pump()
    assert window_updates(pair.c2s) == [100]


def test_no_window_update_after_the_peer_half_closed() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(request(1, b"abc"))
    server.receive_frame(half_close(1))
    server.acknowledge(1, 3)
    assert drain_server(server) == []


def test_no_window_update_after_the_stream_finished() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(request(1, b"abc"))
    server.close_stream(1, None)
    server.acknowledge(1, 3)
    assert window_updates(drain_server(server)) == []

    client = negotiated_client()
    client.open_stream(SERVER_STREAM, (), METHODS[SERVER_STREAM])
    drain_client(client)
    client.receive_frame(response(1, b"abc"))
    client.receive_frame(ServerToClient(stream_id=1, close_stream={}))
    drain_client(client)
    client.acknowledge(1, 3)
    assert drain_client(client) == []


def test_no_window_update_after_a_cancel() -> None:
    client = negotiated_client()
    client.open_stream(SERVER_STREAM, (), METHODS[SERVER_STREAM])
    drain_client(client)
    client.receive_frame(response(1, b"abc"))
    client.cancel(1)
    client.acknowledge(1, 3)
    assert kinds(drain_client(client)) == [(1, "cancel")]


def test_no_window_updates_under_revision_zero() -> None:
    pair = Pair(client_flow_control=False)
    assert pair.client.revision == REVISION_ZERO
    stream_id = pair.open(BIDI)
    pair.client.send_message(stream_id, b"x" * 200_000)  # no window: all of it goes
    _, server_events = pair.pump()
    assert len(data_of(server_events)) == 200_000
    pair.server.acknowledge(stream_id, 200_000)
    pair.server.send_message(stream_id, b"y" * 200_000)
    client_events, _ = pair.pump()
    assert len(data_of(client_events)) == 200_000
    pair.client.acknowledge(stream_id, 200_000)
    pair.pump()
    assert window_updates(pair.c2s) == [] and window_updates(pair.s2c) == []


def test_window_updates_are_ignored_under_revision_zero() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI, revision=REVISION_ZERO, window=0))
    assert server.receive_frame(client_window_update(1, 10)) == []
    server.send_message(1, b"x" * 30_000)
    assert sent_data(drain_server(server)) == 30_000


# -- abuse ------------------------------------------------------------------------


def test_server_data_over_the_window_is_resource_exhausted() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    for _ in range(4):
        assert server.receive_frame(request(1, b"x" * 16_384))
    events = server.receive_frame(request(1, b"y"))
    assert reset(events).code == Status.RESOURCE_EXHAUSTED.value
    assert drain_server(server)[-1].close_stream.status.code == Status.RESOURCE_EXHAUSTED.value
    assert server.receive_frame(new_stream(2, BIDI))  # the tunnel lives


def test_server_data_over_the_window_inside_one_message() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(request(1, b"x" * 16_384, size=100_000))
    for _ in range(3):
        server.receive_frame(more_request(1, b"x" * 16_384))
    assert reset(server.receive_frame(more_request(1, b"x"))).code == (
        Status.RESOURCE_EXHAUSTED.value
    )


def test_acknowledged_data_reopens_the_receive_window() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    for _ in range(4):
        server.receive_frame(request(1, b"x" * 16_384))
    server.acknowledge(1, 16_384)
    assert server.receive_frame(request(1, b"x" * 16_384)) == [
        DataReceived(stream_id=1, data=b"x" * 16_384, end_of_message=True)
    ]


def test_client_data_over_the_window_is_resource_exhausted() -> None:
    client = negotiated_client()
    client.open_stream(SERVER_STREAM, (), METHODS[SERVER_STREAM])
    drain_client(client)
    client.receive_frame(response(1, b"x" * 16_384, size=70_000))
    for _ in range(3):
        client.receive_frame(more_response(1, b"x" * 16_384))
    event = ended(client.receive_frame(more_response(1, b"x")))
    assert event.status is not None
    assert event.status.code == Status.RESOURCE_EXHAUSTED.value
    assert kinds(drain_client(client)) == [(1, "cancel")]


def test_overflowing_window_update_is_capped_and_nothing_breaks() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, SERVER_STREAM, window=2**32 - 1))
    for _ in range(3):
        assert server.receive_frame(client_window_update(1, 2**32 - 1)) == []
    assert server._streams[1].queue.window == MAX_WINDOW
    server.receive_frame(request(1, b"q"))
    server.send_message(1, b"x" * 40_000)
    server.close_stream(1, None)
    frames = drain_server(server)
    assert sent_data(frames) == 40_000
    assert frames[-1].HasField("close_stream")

    client = negotiated_client()
    client.open_stream(BIDI, (), METHODS[BIDI])
    drain_client(client)
    for _ in range(3):
        assert client.receive_frame(server_window_update(1, 2**32 - 1)) == []
    client.send_message(1, b"y" * 40_000)
    assert sent_data(drain_client(client)) == 40_000


def test_window_update_for_a_finished_stream_is_ignored() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.close_stream(1, None)
    drain_server(server)
    assert server.receive_frame(client_window_update(1, 10)) == []


# -- a configured window -------------------------------------------------------------


def test_a_configured_window_is_announced_and_used_by_both_ends() -> None:
    """TunnelOptions.initial_window_size: each end grants what it announces."""
    pair = Pair(initial_window_size=262_144)
    assert pair.s2c[0].settings.initial_window_size == 262_144
    stream_id = pair.open(BIDI)
    assert pair.c2s[0].new_stream.initial_window_size == 262_144
    # Client to server: the server's announced window, not the reference's 64 KiB.
    pair.client.send_message(stream_id, b"p" * 300_000)
    _, server_events = pair.pump()
    assert len(data_of(server_events)) == 262_144
    # Server to client: the window the client announced in new_stream.
    pair.server.send_message(stream_id, b"r" * 300_000)
    client_events, _ = pair.pump()
    assert len(data_of(client_events)) == 262_144


def test_data_over_a_configured_window_is_resource_exhausted() -> None:
    server = negotiated_server(initial_window_size=20_000)
    server.receive_frame(new_stream(1, BIDI))
    assert server.receive_frame(request(1, b"x" * 16_384))
    events = server.receive_frame(request(1, b"y" * 4_000))
    assert reset(events).code == Status.RESOURCE_EXHAUSTED.value
