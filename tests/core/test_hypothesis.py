"""Property tests: hostile frame sequences never break a protocol object.

Random sequences of frames (well-formed, ill-formed and hostile) are fed to
one end, interleaved with random actions of its application.  Stream ids are
drawn mostly from the ids in play (so that sequences get deep into stream
life cycles) and sometimes at random (so that they also hit unknown,
negative and reused ids).  Whatever arrives, the only exception allowed out
of ``receive_frame`` is ``RemoteProtocolError`` (the tunnel ends), and after
every step:

* no stream id is in the stream table that was never opened;
* no frame goes out for a stream after its ``close_stream``/``cancel``, and
  a client sends nothing for a stream before its ``new_stream``;
* every stream gets at most one ending;
* the counts, the round-robin ring, the queues' byte counts and the
  windows agree with the stream table (``invariants.check``).

Once ``receive_frame`` has raised ``RemoteProtocolError``, the object stays
failed: every later frame raises again, no stream can be opened, calls on
the streams it had do nothing, and nothing is left to send.

Every frame crosses the carrying call as the carrier takes it: bounded by
its gRPC prefix (``max_frame_size``), then parsed.  Some frames are over
the bound (big chunks, huge metadata) and some are not frames at all
(random bytes): a frame over the bound, and only such a frame, ends the
tunnel with ``FrameTooLarge`` before the core sees it; metadata over
``max_metadata_size`` in a frame within the bound never ends the tunnel.

At the end the application closes everything and the peer opens every
window: then each stream the server ever saw has had exactly one
``close_stream`` (refused ones included), and both stream tables are empty.
"""

from __future__ import annotations

from collections import Counter
from typing import Any, TypeVar

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from grpclib.const import Status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tunnel._core.events import DataReceived, Negotiated, StreamEnded, StreamOpened, StreamReset
from tunnel._core.flow import MAX_CHUNK
from tunnel._core.framing import decode_frame, frame_length, frame_prefix
from tunnel._core.states import RequestState, ResponseState
from tunnel._pb.tunnel_pb2 import ClientToServer, MessageData, ServerToClient
from tunnel.errors import FrameTooLarge, RemoteProtocolError
from tunnel.options import FRAME_OVERHEAD

from . import invariants
from .helpers import (
    METHODS,
    close,
    negotiated_client,
    negotiated_server,
    new_stream,
    response_headers,
    status,
)
from .helpers import (
    settings as settings_frame,
)

SETTINGS = settings(
    max_examples=200,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

ANY_ID = st.integers(min_value=-3, max_value=12)
SIZES = st.one_of(st.integers(0, 40_000), st.just(2**32 - 1))
DATA = st.one_of(st.binary(max_size=32), st.integers(0, 18_000).map(lambda n: b"d" * n))
WINDOWS = st.one_of(st.integers(0, 70_000), st.just(2**32 - 1))
F = TypeVar("F", bound=Message)

#: Now and then a frame is not one at all, or is one over the bound.
RARE = st.sampled_from(["frame"] * 80 + ["junk", "huge"])
#: Not frames at all: mostly undecodable, sometimes a frame by accident.
JUNK = st.binary(min_size=1, max_size=48)
METADATA_LIMIT = 1_000
#: The smallest bound ``TunnelOptions`` allows for that metadata limit.
FRAME_LIMIT = METADATA_LIMIT + MAX_CHUNK + FRAME_OVERHEAD
METHOD_NAMES = st.sampled_from([*METHODS, "", "/malformed", "/no.Such/Method", "test.Svc/Unary"])


def carry(frame: Message | bytes, frame_type: type[F]) -> F:
    """A frame as the carrier takes it off the carrying call: bounded, parsed.

    Raises ``FrameTooLarge`` exactly for frames over the bound, and
    ``RemoteProtocolError`` for bytes that are not a frame.
    """
    data = frame if isinstance(frame, bytes) else frame.SerializeToString()
    try:
        frame_length(frame_prefix(len(data)), FRAME_LIMIT)
    except FrameTooLarge:
        assert len(data) > FRAME_LIMIT
        raise
    assert len(data) <= FRAME_LIMIT
    return decode_frame(frame_type, data)


def draw_id(data: st.DataObject, in_play: list[int]) -> int:
    """Mostly an id in play, sometimes any id at all."""
    if in_play and data.draw(st.integers(0, 24)) > 0:
        return data.draw(st.sampled_from(in_play))
    return data.draw(ANY_ID)


# -- server ---------------------------------------------------------------------------


def draw_rare(data: st.DataObject, frame_type: type[F]) -> F | bytes | None:
    """Now and then bytes that are not a frame, or a frame over the bound.

    The big frame is a chunk of ``more_*_data`` (field 4 of both frame types).
    None: draw an ordinary frame.
    """
    rare = data.draw(RARE)
    if rare == "junk":
        return data.draw(JUNK)
    if rare == "huge":
        frame = frame_type(stream_id=data.draw(ANY_ID))
        field = "more_request_data" if frame_type is ClientToServer else "more_response_data"
        setattr(frame, field, b"d" * FRAME_LIMIT)
        return frame
    return None


def draw_client_frame(data: st.DataObject, seen: list[int]) -> ClientToServer | bytes:
    if (rare := draw_rare(data, ClientToServer)) is not None:
        return rare
    last = max(seen, default=0)
    kind = (
        "new_stream"
        if not seen
        else data.draw(
            st.sampled_from(
                ["new_stream"] * 3
                + ["request_message"] * 3
                + ["more_request_data", "half_close", "cancel", "window_update", "empty"]
            )
        )
    )
    if kind == "new_stream":
        sid = draw_id(data, [last + 1] * 4 + [last + 3])
        return new_stream(
            sid,
            data.draw(METHOD_NAMES),
            revision=data.draw(st.sampled_from([0, 1, 1, 1, 2])),
            window=data.draw(st.sampled_from([0, 10, 65_536, 65_536, 2**32 - 1])),
            headers=data.draw(
                st.sampled_from(
                    [None, {"x-a": ["1"]}, {"grpc-timeout": ["1S"]}, {"BAD": ["v"]}] * 10
                    + [
                        {"x-bad": ["a\r\nb"]},
                        {"x-big": ["v" * 2 * METADATA_LIMIT]},  # within the frame bound
                        {"x-huge": ["v" * FRAME_LIMIT]},  # over it
                    ]
                )
            ),
        )
    sid = draw_id(data, seen)
    if kind == "request_message":
        message = MessageData(size=data.draw(SIZES), data=data.draw(DATA))
        if data.draw(st.booleans()):
            message.size = len(message.data)
        return ClientToServer(stream_id=sid, request_message=message)
    if kind == "more_request_data":
        return ClientToServer(stream_id=sid, more_request_data=data.draw(DATA))
    if kind == "half_close":
        return ClientToServer(stream_id=sid, half_close=Empty())
    if kind == "cancel":
        return ClientToServer(stream_id=sid, cancel=Empty())
    if kind == "window_update":
        return ClientToServer(stream_id=sid, window_update=data.draw(WINDOWS))
    return ClientToServer(stream_id=sid)


def server_app_step(
    data: st.DataObject, server: Any, opened: list[int], unread: Counter[int]
) -> int | None:
    """One random action of the server's application; returns frames to pull."""
    action = data.draw(
        st.sampled_from(["headers", "send", "send", "close", "ack", "ack", "pull", "shutdown"])
    )
    if action == "pull":
        return data.draw(st.integers(0, 6))
    if action == "shutdown":
        if not data.draw(st.integers(0, 5)):
            server.initiate_shutdown()
        return None
    sid = draw_id(data, opened)
    if not server.is_open(sid):
        return None
    stream = server._streams[sid]
    if action == "headers" and stream.response is ResponseState.OPEN:
        server.send_headers(sid, [("x-h", "v")])
    elif action == "send" and stream.response is not ResponseState.DONE:
        server.send_message(sid, b"r" * data.draw(st.integers(0, 70_000)))
    elif action == "close":
        code = data.draw(st.sampled_from([Status.OK, Status.CANCELLED, Status.INTERNAL]))
        server.close_stream(sid, status(code) if code is not Status.OK else None)
    elif action == "ack" and unread[sid]:
        n = data.draw(st.integers(1, unread[sid]))
        unread[sid] -= n
        server.acknowledge(sid, n)
    return None


@SETTINGS
@given(st.data())
def test_server_survives_any_frame_sequence(data: st.DataObject) -> None:
    server = negotiated_server(max_receive_message_length=50_000, max_metadata_size=METADATA_LIMIT)
    seen: list[int] = []  # every new_stream id taken as "above the last"
    opened: list[int] = []  # the accepted ones
    out: list[ServerToClient] = []
    closed: set[int] = set()
    unread: Counter[int] = Counter()

    def pull(limit: int | None = None) -> None:
        n = 0
        while (limit is None or n < limit) and (frame := server.next_frame()) is not None:
            n += 1
            sid = frame.stream_id
            assert sid in seen, f"frame for stream {sid}, which the client never opened"
            assert sid not in closed, f"frame after close_stream on stream {sid}"
            if frame.HasField("close_stream"):
                closed.add(sid)
            out.append(frame)

    for _ in range(data.draw(st.integers(1, 40))):
        if data.draw(st.integers(0, 2)):
            drawn = draw_client_frame(data, seen)
            last = max(seen, default=0)
            frame = None
            try:
                frame = carry(drawn, ClientToServer)
                events = server.receive_frame(frame)
            except RemoteProtocolError as exc:
                if frame is not None:
                    invariants.failed_for_good(server, opened)
                event(f"server: tunnel aborted ({str(exc).split(',')[0].split('(')[0][:40]})")
                # A new_stream with a fresh id ends the tunnel only if it is
                # over the frame bound, whatever its metadata.
                if isinstance(drawn, ClientToServer) and drawn.HasField("new_stream"):
                    assert drawn.stream_id <= last or isinstance(exc, FrameTooLarge)
                return  # the tunnel ends; nothing more to check
            if frame.HasField("new_stream"):
                assert frame.stream_id > last
                seen.append(frame.stream_id)
            for e in events:
                if isinstance(e, StreamOpened):
                    opened.append(e.stream_id)
                elif isinstance(e, DataReceived | StreamReset):
                    assert e.stream_id in opened
                if isinstance(e, DataReceived):
                    unread[e.stream_id] += len(e.data)
        else:
            limit = server_app_step(data, server, opened, unread)
            if limit is not None:
                pull(limit)
        assert set(server._streams) <= set(opened)
        invariants.check(server)

    # The application closes everything; the client opens every window.
    for sid in opened:
        if server.is_open(sid):
            server.close_stream(sid, None)
    for sid in opened:
        server.receive_frame(ClientToServer(stream_id=sid, window_update=2**31))
    pull()
    event(f"server: completed with {min(len(opened), 3)}+ accepted streams")
    closes = Counter(f.stream_id for f in out if f.HasField("close_stream"))
    assert closes == Counter(seen), "every stream the server saw gets exactly one close_stream"
    assert not server.has_frames()
    assert server._streams == {}
    for sid in seen:  # headers at most once per stream, and before any message
        kinds = [f.WhichOneof("frame") for f in out if f.stream_id == sid]
        assert kinds.count("response_headers") <= 1
        if "response_message" in kinds:
            assert kinds.index("response_headers") < kinds.index("response_message")


# -- client ---------------------------------------------------------------------------


def draw_server_frame(data: st.DataObject, opened: list[int]) -> ServerToClient | bytes:
    if (rare := draw_rare(data, ServerToClient)) is not None:
        return rare
    kind = data.draw(
        st.sampled_from(
            ["response_message"] * 3
            + ["response_headers", "more_response_data", "close_stream", "close_stream"]
            + ["window_update", "settings", "empty"]
        )
    )
    sid = draw_id(data, opened)
    if kind == "response_message":
        message = MessageData(size=data.draw(SIZES), data=data.draw(DATA))
        if data.draw(st.booleans()):
            message.size = len(message.data)
        return ServerToClient(stream_id=sid, response_message=message)
    if kind == "response_headers":
        md = data.draw(
            st.sampled_from(
                [None, {"x-a": ["1"]}, {"BAD": ["1"]}, {"x-b": ["v" * 2 * METADATA_LIMIT]}] * 3
                + [{"x-bad": ["1\x00"]}, {"x-c": ["v" * FRAME_LIMIT]}]  # the last: over the bound
            )
        )
        return response_headers(sid, md)
    if kind == "more_response_data":
        return ServerToClient(stream_id=sid, more_response_data=data.draw(DATA))
    if kind == "close_stream":
        return close(sid, data.draw(st.sampled_from([Status.OK, Status.UNKNOWN, Status.INTERNAL])))
    if kind == "window_update":
        return ServerToClient(stream_id=sid, window_update=data.draw(WINDOWS))
    if kind == "settings":
        return settings_frame(*data.draw(st.lists(st.integers(0, 3), max_size=3)), stream_id=sid)
    return ServerToClient(stream_id=sid)


def client_app_step(
    data: st.DataObject, client: Any, opened: list[int], unread: Counter[int]
) -> int | None:
    """One random action of the client's application; returns frames to pull."""
    action = data.draw(
        st.sampled_from(["open", "open", "send", "send", "half_close", "cancel", "ack", "pull"])
    )
    if action == "pull":
        return data.draw(st.integers(0, 6))
    if action == "open":
        method = data.draw(st.sampled_from(sorted(METHODS)))
        sid = int(client.open_stream(method, (), METHODS[method]))
        assert sid == max(opened, default=0) + 1
        opened.append(sid)
        return None
    sid = draw_id(data, opened)
    if not client.is_open(sid):
        return None
    stream = client._streams[sid]
    if action == "send" and stream.request is RequestState.OPEN:
        client.send_message(sid, b"q" * data.draw(st.integers(0, 70_000)))
    elif action == "half_close" and stream.request in (RequestState.OPEN, RequestState.DONE):
        client.half_close(sid)
    elif action == "cancel":
        client.cancel(sid)
    elif action == "ack" and unread[sid]:
        # The application consumes (some of) what arrived, never more.
        n = data.draw(st.integers(1, unread[sid]))
        unread[sid] -= n
        client.acknowledge(sid, n)
    return None


@SETTINGS
@given(st.data())
def test_client_survives_any_frame_sequence(data: st.DataObject) -> None:
    client = negotiated_client(max_receive_message_length=50_000, max_metadata_size=METADATA_LIMIT)
    opened: list[int] = []
    announced: set[int] = set()  # new_stream went out
    ended: Counter[int] = Counter()
    cancelled: set[int] = set()
    unread: Counter[int] = Counter()
    out: list[ClientToServer] = []

    def pull(limit: int | None = None) -> None:
        n = 0
        while (limit is None or n < limit) and (frame := client.next_frame()) is not None:
            n += 1
            sid = frame.stream_id
            assert sid in opened
            assert sid not in cancelled, f"frame after cancel on stream {sid}"
            if frame.HasField("new_stream"):
                announced.add(sid)
            else:
                assert sid in announced, "a frame for a stream before its new_stream"
            if frame.HasField("cancel"):
                cancelled.add(sid)
            out.append(frame)

    for _ in range(data.draw(st.integers(1, 40))):
        if announced and data.draw(st.integers(0, 2)) > 0:
            drawn = draw_server_frame(data, sorted(announced))
            frame = None
            try:
                frame = carry(drawn, ServerToClient)
                events = client.receive_frame(frame)
            except RemoteProtocolError as exc:
                if frame is not None:
                    invariants.failed_for_good(client, opened)
                event(f"client: tunnel aborted ({str(exc).split(' for ')[0].split('(')[0][:40]})")
                # Headers of a stream in play end the tunnel only if the
                # frame is over the bound, whatever its metadata.
                if isinstance(drawn, ServerToClient) and drawn.HasField("response_headers"):
                    assert drawn.stream_id not in announced or isinstance(exc, FrameTooLarge)
                return
            for e in events:
                assert not isinstance(e, Negotiated), "negotiated twice"
                sid = e.stream_id
                assert sid in opened
                assert ended[sid] == 0, "event after the stream ended"
                if isinstance(e, StreamEnded):
                    ended[sid] += 1
                elif isinstance(e, DataReceived):
                    unread[sid] += len(e.data)
        else:
            limit = client_app_step(data, client, opened, unread)
            if limit is not None:
                pull(limit)
        assert set(client._streams) <= set(opened)
        invariants.check(client)

    # The caller gives up on whatever is still open; the server opens every window.
    for sid in opened:
        if sid in announced:
            client.receive_frame(ServerToClient(stream_id=sid, window_update=2**31))
        client.cancel(sid)
    pull()
    event(f"client: completed with {min(len(opened), 3)}+ streams")
    assert client._streams == {}
    assert not client.has_frames()
