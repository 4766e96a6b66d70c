"""A connected tunnel-client / tunnel-server pair, and hand-built frames.

Modelled on h11's test helpers: the two sans-IO protocol objects are wired
back to back and ``Pair.pump`` moves frames between them until both are quiet.
Every frame crosses the "wire" as bytes (serialized and parsed again), so the
tests also exercise what the protobuf library writes for empty oneof members.

The application side is played by the test itself: it calls the protocol
objects' API and reads the events ``pump`` returns.  Nothing here
acknowledges data on its own, because *when* data is acknowledged is exactly
what the flow-control tests are about.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TypedDict, TypeVar, Unpack, cast

from google.protobuf.empty_pb2 import Empty
from google.protobuf.message import Message
from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status

from tunnel._core import TunnelClientProtocol, TunnelServerProtocol
from tunnel._core.events import (
    DataReceived,
    Event,
    StreamEnded,
    StreamOpened,
    StreamReset,
)
from tunnel._pb.tunnel_pb2 import (
    REVISION_ONE,
    ClientToServer,
    MessageData,
    Metadata,
    NewStream,
    ProtocolRevision,
    ServerToClient,
    Settings,
)

UNARY = "/test.Svc/Unary"
CLIENT_STREAM = "/test.Svc/ClientStream"
SERVER_STREAM = "/test.Svc/ServerStream"
BIDI = "/test.Svc/Bidi"

METHODS: Mapping[str, Cardinality] = {
    UNARY: Cardinality.UNARY_UNARY,
    CLIENT_STREAM: Cardinality.STREAM_UNARY,
    SERVER_STREAM: Cardinality.UNARY_STREAM,
    BIDI: Cardinality.STREAM_STREAM,
}

EMPTY = Empty()

F = TypeVar("F", bound=Message)


def wire(frame: F) -> F:
    """The frame as the peer parses it from the bytes we would write."""
    copy = type(frame)()
    copy.ParseFromString(frame.SerializeToString())
    return copy


def drain_server(proto: TunnelServerProtocol) -> list[ServerToClient]:
    frames = []
    while (frame := proto.next_frame()) is not None:
        frames.append(wire(frame))
    return frames


def drain_client(proto: TunnelClientProtocol) -> list[ClientToServer]:
    frames = []
    while (frame := proto.next_frame()) is not None:
        frames.append(wire(frame))
    return frames


class Pair:
    """A tunnel client connected to a tunnel server, negotiated by default."""

    def __init__(
        self,
        methods: Mapping[str, Cardinality] = METHODS,
        *,
        negotiate: bool = True,
        client_flow_control: bool = True,
        server_flow_control: bool = True,
        max_receive_message_length: int = 4 * 1024 * 1024,
        max_metadata_size: int = 64 * 1024,
        initial_window_size: int = 65_536,
        max_window_size: int | None = None,
    ) -> None:
        self.client = TunnelClientProtocol(
            peer_negotiates=negotiate,
            disable_flow_control=not client_flow_control,
            max_receive_message_length=max_receive_message_length,
            max_metadata_size=max_metadata_size,
            initial_window_size=initial_window_size,
            max_window_size=max_window_size,
        )
        self.server = TunnelServerProtocol(
            methods,
            peer_negotiates=negotiate,
            disable_flow_control=not server_flow_control,
            max_receive_message_length=max_receive_message_length,
            max_metadata_size=max_metadata_size,
            initial_window_size=initial_window_size,
            max_window_size=max_window_size,
        )
        #: Every frame that crossed, in order, per direction.
        self.c2s: list[ClientToServer] = []
        self.s2c: list[ServerToClient] = []
        self.client_events: list[Event] = []
        self.server_events: list[Event] = []
        if negotiate:
            self.pump()

    def pump(self) -> tuple[list[Event], list[Event]]:
        """Move frames both ways until neither end has anything to send.

        Returns the new (client events, server events).
        """
        client_events: list[Event] = []
        server_events: list[Event] = []
        moved = True
        while moved:
            moved = False
            while (out := self.server.next_frame()) is not None:
                frame = wire(out)
                self.s2c.append(frame)
                client_events += self.client.receive_frame(frame)
                moved = True
            while (c2s := self.client.next_frame()) is not None:
                frame_c = wire(c2s)
                self.c2s.append(frame_c)
                server_events += self.server.receive_frame(frame_c)
                moved = True
        self.client_events += client_events
        self.server_events += server_events
        return client_events, server_events

    def open(
        self,
        method: str = BIDI,
        metadata: Iterable[tuple[str, str | bytes]] = (),
        *,
        timeout: float | None = None,
    ) -> int:
        """Open a stream and pump until the server has seen it."""
        stream_id = self.client.open_stream(
            method, metadata, METHODS.get(method, Cardinality.UNARY_UNARY), timeout=timeout
        )
        self.pump()
        return stream_id


E = TypeVar("E", bound=Event)


def of_type(events: Iterable[Event], kind: type[E]) -> list[E]:
    return [e for e in events if isinstance(e, kind)]


def data_of(events: Iterable[Event], stream_id: int | None = None) -> bytes:
    """The message bytes carried by ``DataReceived`` events."""
    return b"".join(
        e.data
        for e in events
        if isinstance(e, DataReceived) and (stream_id is None or e.stream_id == stream_id)
    )


def only(events: Iterable[Event], kind: type[E]) -> E:
    events = list(events)
    matches = of_type(events, kind)
    assert len(matches) == 1, f"expected one {kind.__name__}, got {events}"
    return matches[0]


def ended(events: Iterable[Event]) -> StreamEnded:
    return only(events, StreamEnded)


def reset(events: Iterable[Event]) -> StreamReset:
    return only(events, StreamReset)


def opened(events: Iterable[Event]) -> StreamOpened:
    return only(events, StreamOpened)


def status(code: Status, message: str = "") -> StatusProto:
    return StatusProto(code=code.value, message=message)


# -- hand-built frames ---------------------------------------------------------


def as_revision(number: int) -> ProtocolRevision:
    """*number* as a protocol revision, one that no peer knows included.

    proto3 enums are open: any int32 goes on the wire, and protobuf's Python
    API takes it.  The generated stub types the field with the closed enum
    class, though, and these tests send unknown revisions on purpose.
    """
    return cast(ProtocolRevision, number)


def settings(*revisions: int, window: int = 65_536, stream_id: int = -1) -> ServerToClient:
    return ServerToClient(
        stream_id=stream_id,
        settings=Settings(
            supported_protocol_revisions=[as_revision(r) for r in revisions],
            initial_window_size=window,
        ),
    )


def new_stream(
    stream_id: int,
    method: str = BIDI,
    *,
    revision: int = REVISION_ONE,
    window: int = 65_536,
    headers: Mapping[str, list[str]] | None = None,
) -> ClientToServer:
    md = Metadata()
    for key, values in (headers or {}).items():
        md.md[key].val.extend(values)
    return ClientToServer(
        stream_id=stream_id,
        new_stream=NewStream(
            method_name=method,
            request_headers=md,
            initial_window_size=window,
            protocol_revision=as_revision(revision),
        ),
    )


def request(stream_id: int, data: bytes, size: int | None = None) -> ClientToServer:
    return ClientToServer(
        stream_id=stream_id,
        request_message=MessageData(size=len(data) if size is None else size, data=data),
    )


def more_request(stream_id: int, data: bytes) -> ClientToServer:
    return ClientToServer(stream_id=stream_id, more_request_data=data)


def half_close(stream_id: int) -> ClientToServer:
    return ClientToServer(stream_id=stream_id, half_close=EMPTY)


def cancel(stream_id: int) -> ClientToServer:
    return ClientToServer(stream_id=stream_id, cancel=EMPTY)


def client_window_update(stream_id: int, n: int) -> ClientToServer:
    return ClientToServer(stream_id=stream_id, window_update=n)


def response(stream_id: int, data: bytes, size: int | None = None) -> ServerToClient:
    return ServerToClient(
        stream_id=stream_id,
        response_message=MessageData(size=len(data) if size is None else size, data=data),
    )


def more_response(stream_id: int, data: bytes) -> ServerToClient:
    return ServerToClient(stream_id=stream_id, more_response_data=data)


def response_headers(stream_id: int, md: Mapping[str, list[str]] | None = None) -> ServerToClient:
    frame = ServerToClient(stream_id=stream_id)
    frame.response_headers.SetInParent()
    for key, values in (md or {}).items():
        frame.response_headers.md[key].val.extend(values)
    return frame


def close(stream_id: int, code: Status = Status.OK, message: str = "") -> ServerToClient:
    frame = ServerToClient(stream_id=stream_id)
    frame.close_stream.response_trailers.SetInParent()
    if code is not Status.OK:
        frame.close_stream.status.code = code.value
        frame.close_stream.status.message = message
    return frame


def server_window_update(stream_id: int, n: int) -> ServerToClient:
    return ServerToClient(stream_id=stream_id, window_update=n)


class ClientSettings(TypedDict, total=False):
    """The keyword arguments of ``TunnelClientProtocol`` a test may set."""

    disable_flow_control: bool
    max_receive_message_length: int
    max_metadata_size: int
    initial_window_size: int
    max_window_size: int | None


class ServerSettings(ClientSettings, total=False):
    """The keyword arguments of ``TunnelServerProtocol`` a test may set."""

    fallback: Cardinality | None
    max_concurrent_streams: int | None


def negotiated_server(
    methods: Mapping[str, Cardinality] = METHODS, **options: Unpack[ServerSettings]
) -> TunnelServerProtocol:
    """A tunnel server whose Settings frame has already been written."""
    server = TunnelServerProtocol(methods, peer_negotiates=True, **options)
    first = server.next_frame()
    assert first is not None and first.WhichOneof("frame") == "settings"
    return server


def negotiated_client(**options: Unpack[ClientSettings]) -> TunnelClientProtocol:
    """A tunnel client that has received the reference's Settings frame."""
    client = TunnelClientProtocol(peer_negotiates=True, **options)
    client.receive_frame(settings(0, 1))
    return client


def kinds(frames: Iterable[ClientToServer | ServerToClient]) -> list[tuple[int, str | None]]:
    """(stream id, oneof name) of each frame: the shape of a conversation."""
    return [(f.stream_id, f.WhichOneof("frame")) for f in frames]
