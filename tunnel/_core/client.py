"""The tunnel client: the end that starts streams inside the tunnel.

It is the network client of a forward tunnel and the network server of a
reverse one; the protocol is the same either way.

Negotiation: if the peer advertised ``grpctunnel-negotiate: on`` in the
carrying call's headers, its first frame must be ``Settings`` on stream -1,
and no stream may be created before it arrives; the highest revision both
ends support is used.  Without that header the peer is a revision-zero
implementation and the tunnel is ready at once.

Stream ids are chosen here, strictly increasing from 1 and never reused, so
"a frame for an id we never created" is simply an id above the last one:
that is a broken peer, and ends the tunnel.  A frame for a lower id whose
stream is gone is late (the peer had not yet seen our cancel, say) and is
ignored.
"""

from __future__ import annotations

from collections.abc import Iterable

from google.protobuf.empty_pb2 import Empty
from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from grpclib.metadata import encode_timeout

from .._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    MessageData,
    Metadata,
    NewStream,
    ServerToClient,
)
from ..errors import LocalProtocolError, NegotiationError, RemoteProtocolError
from .connection import KEEPALIVE_METHOD, Connection, StreamState
from .events import DataReceived, Event, HeadersReceived, Negotiated, StreamEnded
from .flow import INITIAL_WINDOW_SIZE, StreamFault
from .metadata import MetadataError, MetadataPairs, decode_metadata, encode_metadata

__all__ = ["TunnelClientProtocol"]

_EMPTY = Empty()


class TunnelClientProtocol(Connection[ClientToServer]):
    """Sans-IO tunnel client: open streams, send requests, read responses.

    ``peer_negotiates`` says whether the tunnel server's side of the carrying
    call sent ``grpctunnel-negotiate: on``.
    """

    def __init__(
        self,
        *,
        peer_negotiates: bool,
        disable_flow_control: bool = False,
        max_receive_message_length: int = 4 * 1024 * 1024,
        max_metadata_size: int = 64 * 1024,
        initial_window_size: int = INITIAL_WINDOW_SIZE,
    ) -> None:
        super().__init__(
            max_receive_message_length=max_receive_message_length,
            max_metadata_size=max_metadata_size,
            initial_window_size=initial_window_size,
        )
        self._supported = {REVISION_ZERO} if disable_flow_control else {REVISION_ZERO, REVISION_ONE}
        #: None until negotiation is done.
        self.revision: int | None = None if peer_negotiates else REVISION_ZERO
        #: The send window of each new stream: the server's initial window.
        self._initial_send_window = INITIAL_WINDOW_SIZE

    @property
    def ready(self) -> bool:
        """True once streams may be created."""
        return self.revision is not None

    # -- frame constructors ---------------------------------------------

    def _first_chunk(self, stream_id: int, size: int, data: bytes) -> ClientToServer:
        return ClientToServer(
            stream_id=stream_id, request_message=MessageData(size=size, data=data)
        )

    def _more_data(self, stream_id: int, data: bytes) -> ClientToServer:
        return ClientToServer(stream_id=stream_id, more_request_data=data)

    def _window_update(self, stream_id: int, n: int) -> ClientToServer:
        return ClientToServer(stream_id=stream_id, window_update=n)

    # -- the application's side ----------------------------------------

    def open_stream(
        self,
        method: str,
        metadata: Iterable[tuple[str, str | bytes]],
        cardinality: Cardinality,
        *,
        timeout: float | None = None,
    ) -> int:
        """Start a stream and return its id.

        ``timeout`` (seconds) travels as a ``grpc-timeout`` request header, so
        the tunnel server can enforce the deadline too.  Raises
        ``MetadataError`` (a ``ValueError``) for metadata that cannot travel;
        then no stream is created.
        """
        if self.revision is None:
            raise LocalProtocolError("the tunnel is not ready: negotiation is not done")
        new_stream = NewStream(
            method_name=method,
            initial_window_size=self.initial_window_size,
            protocol_revision=self.revision,  # type: ignore[arg-type]
        )
        headers = new_stream.request_headers
        headers.SetInParent()
        encode_metadata(metadata, headers, limit=self.max_metadata_size)
        if timeout is not None:
            headers.md["grpc-timeout"].val.append(encode_timeout(max(timeout, 0.0)))
        self._last_id += 1
        stream_id = self._last_id
        st = self._add_stream(
            stream_id,
            cardinality,
            send_window=self._initial_send_window,
            flow_control=self.revision == REVISION_ONE,
        )
        if method == KEEPALIVE_METHOD:
            st.counted = False
            self._probes_active += 1
        else:
            self.counters.streams_opened += 1
        self._queue(st, ClientToServer(stream_id=stream_id, new_stream=new_stream))
        return stream_id

    def send_message(self, stream_id: int, data: bytes) -> None:
        """Queue one serialized request message."""
        st = self._active(stream_id)
        if not st.sending:
            raise LocalProtocolError("the request stream was already half-closed")
        if not st.cardinality.value.client_streaming and st.sent_messages:
            raise LocalProtocolError("a unary request stream takes exactly one message")
        st.sent_messages += 1
        self._queue_message(st, data)

    def half_close(self, stream_id: int) -> None:
        """No more requests on this stream."""
        st = self._active(stream_id)
        if not st.sending:
            raise LocalProtocolError("the request stream was already half-closed")
        st.sending = False
        self._queue(st, ClientToServer(stream_id=stream_id, half_close=_EMPTY))

    def cancel(self, stream_id: int) -> None:
        """Abort a stream.  Unsent data is dropped; a no-op on a finished stream."""
        st = self._streams.get(stream_id)
        if st is None or st.finished:
            return
        announced = not _unannounced(st)
        self._failed(st)
        st.pending.clear()
        st.buffered = 0
        if announced:
            st.pending.append(ClientToServer(stream_id=stream_id, cancel=_EMPTY))
            self._schedule(st)
        self._finish(st, drop_pending=False)

    # -- the peer's side -------------------------------------------------

    def receive_frame(self, frame: ServerToClient) -> list[Event]:
        """Process one frame from the tunnel server.

        Raises ``RemoteProtocolError`` if the frame means the tunnel cannot go
        on; faults of one stream end that stream with a ``StreamEnded``.
        """
        kind = frame.WhichOneof("frame")
        if self.revision is None:
            return [self._negotiate(frame, kind)]
        stream_id = frame.stream_id
        queued = self._streams.get(stream_id)
        if queued is not None and _unannounced(queued):
            # Our new_stream for it has not even been written: the server
            # cannot know this id, so it is making frames up.
            raise RemoteProtocolError(
                f"tunnel server sent a {kind or 'empty'} frame for stream {stream_id}, "
                "whose new_stream was never sent"
            )
        if kind == "window_update":
            return self._window_update_received(stream_id, frame.window_update)
        st = self._protocol_stream(stream_id)
        if st is None:
            if 0 < stream_id <= self._last_id or (kind == "settings" and stream_id == -1):
                return []  # late frame for a finished stream, or repeated settings
            raise RemoteProtocolError(
                f"tunnel server sent a {kind or 'empty'} frame for stream {stream_id}, "
                "which was never opened"
            )
        try:
            return self._dispatch(st, frame, kind)
        except StreamFault as fault:
            return [self._fail(st, fault.status, fault.message)]

    def _negotiate(self, frame: ServerToClient, kind: str | None) -> Event:
        if kind != "settings" or frame.stream_id != -1:
            raise NegotiationError(
                "tunnel server promised protocol negotiation, but its first frame "
                f"was {kind or 'empty'} on stream {frame.stream_id}, not settings on stream -1"
            )
        common = self._supported.intersection(frame.settings.supported_protocol_revisions)
        if not common:
            offered = list(frame.settings.supported_protocol_revisions)
            raise NegotiationError(
                f"no protocol revision in common: server offers {offered}, "
                f"client supports {sorted(self._supported)}"
            )
        self.revision = max(common)
        self._initial_send_window = frame.settings.initial_window_size
        return Negotiated(self.revision)

    def _dispatch(self, st: StreamState, frame: ServerToClient, kind: str | None) -> list[Event]:
        if kind == "response_message":
            return [*self._headers_first(st), self._first(st, frame.response_message)]
        if kind == "more_response_data":
            complete = st.inbound.more(frame.more_response_data)
            return [self._data(st, frame.more_response_data, complete)]
        if kind == "response_headers":
            if st.headers_done:
                raise StreamFault(Status.INTERNAL, "tunnel server sent response headers twice")
            st.headers_done = True
            return [HeadersReceived(st.id, self._decode(frame.response_headers))]
        if kind == "close_stream":
            return self._closed(st, frame)
        if kind == "settings":
            raise StreamFault(Status.INTERNAL, "tunnel server sent settings on a stream")
        raise StreamFault(Status.INTERNAL, "tunnel server sent a frame with no content")

    def _headers_first(self, st: StreamState) -> list[Event]:
        # The reference always sends headers before a message; a peer that
        # does not gets empty headers implied rather than a failed call.
        if st.headers_done:
            return []
        st.headers_done = True
        return [HeadersReceived(st.id, ())]

    def _first(self, st: StreamState, envelope: MessageData) -> DataReceived:
        if st.inbound.messages_started and not st.cardinality.value.server_streaming:
            raise StreamFault(
                Status.INTERNAL, "tunnel server sent more than one response for a unary method"
            )
        complete = st.inbound.envelope(envelope.size, envelope.data)
        return self._data(st, envelope.data, complete)

    def _closed(self, st: StreamState, frame: ServerToClient) -> list[Event]:
        close = frame.close_stream
        status = close.status if close.HasField("status") and close.status.code else None
        try:
            trailers = self._decode(close.response_trailers)
        except StreamFault as fault:
            status, trailers = StatusProto(code=fault.status.value, message=fault.message), ()
        if st.inbound.in_message and status is None:
            status = StatusProto(
                code=Status.INTERNAL.value,
                message="tunnel server closed the stream in the middle of a message",
            )
        if status is not None:
            self._failed(st)
        self._finish(st, drop_pending=True)
        return [StreamEnded(st.id, status, trailers)]

    def _decode(self, md: Metadata) -> MetadataPairs:
        try:
            return decode_metadata(md, limit=self.max_metadata_size)
        except MetadataError as exc:
            raise StreamFault(Status.INTERNAL, f"tunnel server sent bad metadata: {exc}") from None

    def _fail(self, st: StreamState, status: Status, message: str) -> StreamEnded:
        """End a stream the server broke: tell the server, tell the caller.

        Exactly like an application's cancel: if the ``new_stream`` frame
        has not gone out yet, nothing goes out (a ``cancel`` for a stream
        the server never saw would make it end the whole tunnel).
        """
        self.cancel(st.id)
        return StreamEnded(st.id, StatusProto(code=status.value, message=message), (), reset=True)


def _unannounced(st: StreamState) -> bool:
    """True while a stream's new_stream frame still waits in its queue.

    new_stream is queued first and leaves first, so it is at the head of the
    queue until the writer pulls it.
    """
    head = st.pending[0] if st.pending else None
    return isinstance(head, ClientToServer) and head.HasField("new_stream")
