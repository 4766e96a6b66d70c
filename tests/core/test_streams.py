"""Stream ids, refusals, late frames: what ends a stream and what ends the tunnel."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from grpclib.const import Status

from tunnel._core import TunnelServerProtocol
from tunnel._core.events import DataReceived, HalfClosed, StreamEnded, StreamOpened, StreamReset
from tunnel._pb.tunnel_pb2 import REVISION_ONE, REVISION_ZERO, ClientToServer, ServerToClient
from tunnel.errors import RemoteProtocolError

from .helpers import (
    BIDI,
    METHODS,
    UNARY,
    Pair,
    cancel,
    client_window_update,
    close,
    drain_client,
    drain_server,
    half_close,
    kinds,
    more_request,
    negotiated_client,
    negotiated_server,
    new_stream,
    opened,
    request,
    response,
    response_headers,
    server_window_update,
)


def refusal(frames: list[ServerToClient]) -> tuple[int, str]:
    """(code, message) of the single close_stream a refused stream gets."""
    assert kinds(frames) == [(frames[0].stream_id, "close_stream")], frames
    close = frames[0].close_stream
    # Only close_stream: no response headers before it, and no trailers in it.
    assert not close.HasField("response_trailers")
    return close.status.code, close.status.message


# -- ids -----------------------------------------------------------------------


def test_client_ids_strictly_increase_from_one() -> None:
    client = negotiated_client()
    ids = [client.open_stream(UNARY, (), METHODS[UNARY]) for _ in range(3)]
    assert ids == [1, 2, 3]
    client.cancel(2)
    assert client.open_stream(UNARY, (), METHODS[UNARY]) == 4
    assert [f.stream_id for f in drain_client(client) if f.HasField("new_stream")] == [1, 3, 4]


def test_server_accepts_any_id_above_the_last_seen() -> None:
    server = negotiated_server()
    assert opened(server.receive_frame(new_stream(5))).stream_id == 5
    assert opened(server.receive_frame(new_stream(100))).stream_id == 100


@pytest.mark.parametrize("reused", [0, 3, 4, -1, -(2**63)])
def test_new_stream_not_above_the_last_seen_aborts_the_tunnel(reused: int) -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(4))
    with pytest.raises(RemoteProtocolError):
        server.receive_frame(new_stream(reused))


@pytest.mark.parametrize("stream_id", [0, -1, -5])
def test_negative_or_zero_id_on_the_first_new_stream_aborts_the_tunnel(stream_id: int) -> None:
    server = negotiated_server()
    with pytest.raises(RemoteProtocolError):
        server.receive_frame(new_stream(stream_id))


def test_reusing_an_active_id_aborts_the_tunnel() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1))
    with pytest.raises(RemoteProtocolError):
        server.receive_frame(new_stream(1))


@pytest.mark.parametrize(
    "frame",
    [
        request(2, b"x"),
        more_request(2, b"x"),
        half_close(2),
        cancel(2),
        client_window_update(2, 10),
        ClientToServer(stream_id=2),
    ],
    ids=lambda f: f.WhichOneof("frame") or "empty",
)
def test_server_aborts_on_any_frame_for_an_id_never_created(frame: ClientToServer) -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1))
    with pytest.raises(RemoteProtocolError):
        server.receive_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [
        response_headers(2),
        response(2, b"x"),
        close(2),
        server_window_update(2, 10),
        ServerToClient(stream_id=2),
        ServerToClient(stream_id=0, response_headers={}),
    ],
    ids=["headers", "message", "close", "window_update", "empty", "stream-0"],
)
def test_client_aborts_on_any_frame_for_an_id_never_created(frame: ServerToClient) -> None:
    client = negotiated_client()
    client.open_stream(UNARY, (), METHODS[UNARY])
    with pytest.raises(RemoteProtocolError):
        client.receive_frame(frame)


@pytest.mark.parametrize(
    "frame",
    [request(1, b"x"), more_request(1, b"x"), half_close(1), cancel(1), client_window_update(1, 3)],
    ids=lambda f: f.WhichOneof("frame"),
)
def test_server_ignores_late_frames_for_a_finished_stream(frame: ClientToServer) -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1))
    server.close_stream(1, None)
    drain_server(server)
    assert server.receive_frame(frame) == []
    assert drain_server(server) == []
    # The tunnel lives on.
    assert opened(server.receive_frame(new_stream(2))).stream_id == 2


@pytest.mark.parametrize(
    "frame",
    [response_headers(1), response(1, b"x"), close(1), server_window_update(1, 3)],
    ids=lambda f: f.WhichOneof("frame"),
)
def test_client_ignores_late_frames_for_a_finished_stream(frame: ServerToClient) -> None:
    client = negotiated_client()
    stream_id = client.open_stream(BIDI, (), METHODS[BIDI])
    drain_client(client)
    client.cancel(stream_id)
    assert kinds(drain_client(client)) == [(1, "cancel")]
    assert client.receive_frame(frame) == []
    assert drain_client(client) == []


def test_client_ignores_a_message_after_close_stream() -> None:
    # Observed from the reference (vectors/fwd_fc_deadline_client): its
    # handler kept running and sent a response after the close.
    pair = Pair()
    stream_id = pair.open(UNARY)
    pair.server.close_stream(stream_id, None)
    pair.pump()
    assert pair.client.receive_frame(response(stream_id, b"late")) == []
    assert not pair.client.is_open(stream_id)


# -- refusals --------------------------------------------------------------------


def test_new_stream_while_shutting_down_is_refused_unavailable() -> None:
    server = negotiated_server()
    server.initiate_shutdown()
    assert server.receive_frame(new_stream(1)) == []
    code, _ = refusal(drain_server(server))
    assert code == Status.UNAVAILABLE.value


def test_running_streams_go_on_after_initiate_shutdown() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.server.initiate_shutdown()
    pair.client.send_message(stream_id, b"still here")
    _, server_events = pair.pump()
    (event,) = server_events
    assert isinstance(event, DataReceived) and event.stream_id == stream_id
    pair.server.send_message(stream_id, b"answer")
    pair.server.close_stream(stream_id, None)
    client_events, _ = pair.pump()
    last = client_events[-1]
    assert isinstance(last, StreamEnded) and last.status is None


@pytest.mark.parametrize("revision", [2, 7])
def test_unknown_revision_is_refused_unavailable(revision: int) -> None:
    server = negotiated_server()
    assert server.receive_frame(new_stream(1, revision=revision)) == []
    code, _ = refusal(drain_server(server))
    assert code == Status.UNAVAILABLE.value


def test_revision_one_stream_on_a_server_without_flow_control_is_refused() -> None:
    server = negotiated_server(disable_flow_control=True)
    server.receive_frame(new_stream(1, revision=REVISION_ONE))
    code, _ = refusal(drain_server(server))
    assert code == Status.UNAVAILABLE.value
    assert opened(server.receive_frame(new_stream(2, revision=REVISION_ZERO)))


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/malformed", "malformed is not a well-formed method name"),
        ("", "'' is not a well-formed method name"),
        ("/", "'/' is not a well-formed method name"),
        ("/a/b/c", "a/b/c is not a well-formed method name"),
        ("/svc/", "svc/ is not a well-formed method name"),
    ],
)
def test_ill_formed_method_name_is_refused_invalid_argument(name: str, message: str) -> None:
    server = negotiated_server()
    assert server.receive_frame(new_stream(1, name)) == []
    code, text = refusal(drain_server(server))
    assert code == Status.INVALID_ARGUMENT.value
    assert text.endswith("is not a well-formed method name")
    if name:
        assert text == message


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("/grpchantesting.TestService/NoSuchMethod", "grpchantesting.TestService/NoSuchMethod"),
        ("/no.such.Service/Method", "no.such.Service/Method"),
        ("test.Svc/Nope", "test.Svc/Nope"),
    ],
)
def test_unknown_method_is_refused_unimplemented(name: str, message: str) -> None:
    server = negotiated_server()
    assert server.receive_frame(new_stream(1, name)) == []
    code, text = refusal(drain_server(server))
    assert (code, text) == (Status.UNIMPLEMENTED.value, f"{message} not implemented")


def test_method_name_without_leading_slash_is_accepted() -> None:
    server = negotiated_server()
    assert opened(server.receive_frame(new_stream(1, "test.Svc/Unary"))).method == UNARY


@pytest.mark.parametrize(
    "refuse",
    [
        lambda s: s.receive_frame(new_stream(1, "/no.Such/Method")),
        lambda s: s.receive_frame(new_stream(1, "")),
        lambda s: s.receive_frame(new_stream(1, revision=9)),
        lambda s: (s.initiate_shutdown(), s.receive_frame(new_stream(1))),
    ],
    ids=["unknown-method", "empty-name", "unknown-revision", "shutting-down"],
)
def test_a_refused_stream_counts_as_used(refuse: Callable[[TunnelServerProtocol], object]) -> None:
    server = negotiated_server()
    refuse(server)
    drain_server(server)
    # The reference client sends the request right behind new_stream: it is
    # ignored, and the tunnel lives (the reference aborted it for a bad revision).
    for frame in [
        request(1, b"x"),
        more_request(1, b"y"),
        half_close(1),
        cancel(1),
        client_window_update(1, 4),
    ]:
        assert server.receive_frame(frame) == []
    assert drain_server(server) == []
    # The id is used up ...
    with pytest.raises(RemoteProtocolError):
        server.receive_frame(new_stream(1))


def test_tunnel_lives_after_refusals() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, "/no.Such/Method"))
    server.receive_frame(request(1, b"x"))
    assert opened(server.receive_frame(new_stream(2, UNARY))).stream_id == 2


def test_refusal_reaches_the_client_as_the_stream_status() -> None:
    pair = Pair()
    stream_id = pair.client.open_stream("/no.Such/Method", (), METHODS[UNARY])
    pair.client.send_message(stream_id, b"x")
    pair.client.half_close(stream_id)
    client_events, server_events = pair.pump()
    assert server_events == []
    (event,) = client_events
    assert isinstance(event, StreamEnded)
    assert event.status is not None
    assert event.status.code == Status.UNIMPLEMENTED.value
    assert event.trailers == ()
    assert not pair.client.is_open(stream_id)


# -- half-close ----------------------------------------------------------------


def test_half_close_reaches_the_server_and_the_stream_still_answers() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    pair.client.send_message(stream_id, b"one")
    pair.client.half_close(stream_id)
    _, server_events = pair.pump()
    assert server_events[-1] == HalfClosed(stream_id=stream_id)
    pair.server.send_message(stream_id, b"reply")
    pair.server.close_stream(stream_id, None)
    client_events, _ = pair.pump()
    assert b"".join(e.data for e in client_events if hasattr(e, "data")) == b"reply"


def test_data_after_half_close_fails_the_stream() -> None:
    server = negotiated_server()
    server.receive_frame(new_stream(1, BIDI))
    server.receive_frame(half_close(1))
    (event,) = server.receive_frame(request(1, b"x"))
    assert isinstance(event, StreamReset)
    assert event.code == Status.INTERNAL.value
    frames = drain_server(server)
    assert frames[-1].close_stream.status.code == Status.INTERNAL.value


def test_stream_opened_carries_method_metadata_and_cardinality() -> None:
    server = negotiated_server()
    event = opened(server.receive_frame(new_stream(1, UNARY, headers={"x-a": ["1", "2"]})))
    assert isinstance(event, StreamOpened)
    assert event.method == UNARY
    assert event.metadata == (("x-a", "1"), ("x-a", "2"))
    assert event.cardinality is METHODS[UNARY]
    assert event.timeout is None


def test_server_never_lists_never_opened_streams() -> None:
    server = TunnelServerProtocol(METHODS, peer_negotiates=False)
    server.receive_frame(new_stream(3, "/no.Such/Method"))
    server.receive_frame(new_stream(5))
    assert not server.is_open(3)
    assert not server.is_open(4)
    assert server.is_open(5)
