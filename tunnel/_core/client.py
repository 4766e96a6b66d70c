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

The client sends the request half and receives the response half of each
stream (``states.py``).  A new stream's response half is ``IDLE`` until the
writer takes its ``new_stream`` frame: until then the server cannot know
the id, so any frame for it is made up and ends the tunnel, and a cancel
sends nothing (the server would end the tunnel for a cancel of an id it
never saw).
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.protobuf.empty_pb2 import Empty
from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status

from .._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    MessageData,
    Metadata,
    NewStream,
    ServerToClient,
)
from ..errors import LocalProtocolError, NegotiationError
from .connection import (
    KEEPALIVE_METHOD,
    RESPONSE_IDLE,
    RESPONSE_OPEN,
    SERVER_STREAMING,
    T_FAILED,
    T_OPEN,
    Connection,
    Stream,
)
from .events import Event, HeadersReceived, Negotiated, StreamEnded
from .flow import INITIAL_WINDOW_SIZE, StreamFault
from .metadata import (
    MetadataError,
    MetadataPairs,
    decode_metadata,
    encode_metadata,
    encode_timeout_up,
)
from .states import Go, Input, Reset, ResponseState, TunnelState

__all__ = ["TunnelClientProtocol"]

_EMPTY = Empty()

_SEND_MESSAGE = Input.SEND_MESSAGE
_HALF_CLOSE = Input.HALF_CLOSE
_CANCEL = Input.CANCEL
_MESSAGE = Input.RECV_RESPONSE_MESSAGE
_MORE_DATA = Input.RECV_MORE_RESPONSE_DATA
_HEADERS = Input.RECV_RESPONSE_HEADERS
_CLOSE_STREAM = Input.RECV_CLOSE_STREAM
_WINDOW_UPDATE = Input.RECV_WINDOW_UPDATE


class TunnelClientProtocol(Connection[ClientToServer]):
    """Sans-IO tunnel client: open streams, send requests, read responses.

    ``peer_negotiates`` says whether the tunnel server's side of the carrying
    call sent ``grpctunnel-negotiate: on``.
    """

    _peer = "tunnel server"
    _peer_sends_response = True

    def __init__(
        self,
        *,
        peer_negotiates: bool,
        disable_flow_control: bool = False,
        max_receive_message_length: int = 4 * 1024 * 1024,
        max_metadata_size: int = 64 * 1024,
        initial_window_size: int = INITIAL_WINDOW_SIZE,
        max_window_size: int | None = None,
    ) -> None:
        super().__init__(
            max_receive_message_length=max_receive_message_length,
            max_metadata_size=max_metadata_size,
            initial_window_size=initial_window_size,
            max_window_size=max_window_size,
        )
        self._supported = {REVISION_ZERO} if disable_flow_control else {REVISION_ZERO, REVISION_ONE}
        #: None until negotiation is done.
        self.revision: int | None = None if peer_negotiates else REVISION_ZERO
        if peer_negotiates:
            self.state = TunnelState.NEGOTIATING
        #: The send window of each new stream: the server's initial window.
        self._initial_send_window = INITIAL_WINDOW_SIZE

    @property
    def ready(self) -> bool:
        """True once (and while) streams may be created."""
        return self.state is T_OPEN

    # -- frame constructors ---------------------------------------------

    def message_frame(self, stream_id: int, size: int, data: bytes) -> ClientToServer:
        return ClientToServer(
            stream_id=stream_id, request_message=MessageData(size=size, data=data)
        )

    def more_data_frame(self, stream_id: int, data: bytes) -> ClientToServer:
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
        then no stream is created.  Raises ``LocalProtocolError`` before
        negotiation is done, and ``TunnelFailedError`` once the tunnel failed.
        """
        if self.state is not T_OPEN:
            if self.state is T_FAILED:
                raise self._closed()
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
            headers.md["grpc-timeout"].val.append(encode_timeout_up(timeout))
        self._last_id += 1
        stream_id = self._last_id
        st = self._add_stream(
            stream_id,
            cardinality,
            response=RESPONSE_IDLE,
            send_window=self._initial_send_window,
            flow_control=self.revision == REVISION_ONE,
        )
        if cardinality in SERVER_STREAMING:
            new_stream.initial_window_size += self._grow_at_start(st)
        if method == KEEPALIVE_METHOD:
            st.counted = False
            self._probes_active += 1
        else:
            self.counters.streams_opened += 1
        self._queue(st, ClientToServer(stream_id=stream_id, new_stream=new_stream))
        return stream_id

    def send_message(self, stream_id: int, data: bytes) -> None:
        """Queue one serialized request message."""
        allowed = self._call(stream_id, _SEND_MESSAGE, response=False)
        if allowed is not None:
            st, step = allowed
            st.request = step.next
            self._queue_message(st, data)

    def half_close(self, stream_id: int) -> None:
        """No more requests on this stream."""
        allowed = self._call(stream_id, _HALF_CLOSE, response=False)
        if allowed is not None:
            st, step = allowed
            st.request = step.next
            self._queue(st, ClientToServer(stream_id=stream_id, half_close=_EMPTY))

    def cancel(self, stream_id: int) -> None:
        """Abort a stream.  Unsent data is dropped; a no-op on a stream that is over."""
        allowed = self._call(stream_id, _CANCEL, response=False)
        if allowed is not None:
            self._cancel(allowed[0])

    def _cancel(self, st: Stream[ClientToServer]) -> None:
        """End a running stream from this side.

        If its ``new_stream`` has not gone out yet, nothing goes out: a
        ``cancel`` for a stream the server never saw would make it end the
        whole tunnel.
        """
        self._count_failed(st)
        queue = st.queue
        queue.clear()
        if st.response is not RESPONSE_IDLE:
            queue.append(ClientToServer(stream_id=st.id, cancel=_EMPTY))
            self._schedule(st)
        self._end(st)

    # -- the peer's side -------------------------------------------------

    if TYPE_CHECKING:

        def receive_frame(self, frame: ServerToClient) -> list[Event]:
            """Process one frame from the tunnel server (``Connection.receive_frame``)."""
            ...

    def _not_open(self, frame: ServerToClient) -> list[Event] | None:
        if self.state is T_FAILED:
            raise self._failed_again()
        return [self._negotiate(frame, frame.WhichOneof("frame"))]

    def _no_stream(self, stream_id: int, kind: str | None, frame: ServerToClient) -> list[Event]:
        if kind == "settings" and stream_id == -1:
            return []  # settings again: nothing to do
        return super()._no_stream(stream_id, kind, frame)

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
        self.state = T_OPEN
        return Negotiated(revision=self.revision)

    def _dispatch(
        self,
        st: Stream[ClientToServer],
        step: Go[ResponseState],
        input_: Input,
        frame: ServerToClient,
    ) -> list[Event]:
        """A frame the table let through: check its bytes, then move on."""
        if input_ is _MESSAGE:
            envelope = frame.response_message
            complete = st.inbound.envelope(envelope.size, envelope.data)
            data = self._data(st, envelope.data, complete)
            if st.response is RESPONSE_OPEN:
                # The reference always sends headers before a message; a
                # peer that does not gets empty headers implied rather
                # than a failed call.
                st.response = step.next
                return [HeadersReceived(stream_id=st.id, metadata=()), data]
            st.response = step.next
            return [data]
        if input_ is _MORE_DATA:
            complete = st.inbound.more(frame.more_response_data)
            return [self._data(st, frame.more_response_data, complete)]
        if input_ is _WINDOW_UPDATE:
            return self._window_opened(st, frame.window_update)
        if input_ is _HEADERS:
            metadata = self._decode(frame.response_headers)
            st.response = step.next
            return [HeadersReceived(stream_id=st.id, metadata=metadata)]
        if input_ is _CLOSE_STREAM:
            return self._close_received(st, frame)
        raise AssertionError(f"the state table let {input_.name} through on the client")

    def _close_received(self, st: Stream[ClientToServer], frame: ServerToClient) -> list[Event]:
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
            self._count_failed(st)
        st.queue.clear()  # requests not yet sent have no one to go to
        self._end(st)
        return [StreamEnded(stream_id=st.id, status=status, trailers=trailers)]

    def _decode(self, md: Metadata) -> MetadataPairs:
        try:
            return decode_metadata(md, limit=self.max_metadata_size)
        except MetadataError as exc:
            raise StreamFault(Status.INTERNAL, f"tunnel server sent bad metadata: {exc}") from None

    def _stream_fault(self, st: Stream[ClientToServer], reset: Reset) -> StreamEnded:
        """End a stream the server broke: tell the server, tell the caller.

        Exactly like an application's cancel (``_cancel``).
        """
        self._cancel(st)
        return StreamEnded(
            stream_id=st.id,
            status=StatusProto(code=reset.status.value, message=reset.message),
            trailers=(),
            reset=True,
        )
