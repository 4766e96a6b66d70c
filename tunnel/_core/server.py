"""The tunnel server: the end that serves the streams a tunnel client starts.

It is the network server of a forward tunnel and the network client of a
reverse one.

Stream ids come from the client and must grow: a ``new_stream`` whose id is
not above the last one seen (negative ids included) is a broken peer and ends
the tunnel, and so does any other frame for an id above the last one seen.  A
stream refused at creation (unknown method, ill-formed name, unknown
revision, shutting down) still counts as used: it gets one ``close_stream``
and the frames that follow it are ignored like any late frame.

Every accepted stream ends with exactly one ``close_stream``.  If the
application never sent response headers, empty ones go first, as the
reference does; only refused streams get a ``close_stream`` alone.

The server receives the request half and sends the response half of each
stream (``states.py``).  When a stream ends early (the client cancelled it,
or broke one of its rules), the server drops the responses still queued
and sends the status at once; headers already queued stay (they are the
stream's first frame, so they are at the head of its queue).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from grpclib.metadata import decode_timeout

from .._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    CloseStream,
    MessageData,
    Metadata,
    NewStream,
    ServerToClient,
    Settings,
)
from ..errors import RemoteProtocolError
from .connection import (
    CLIENT_STREAMING,
    KEEPALIVE_METHOD,
    RESPONSE_OPEN,
    T_OPEN,
    Connection,
    Stream,
)
from .events import Event, HalfClosed, StreamOpened, StreamReset
from .flow import INITIAL_WINDOW_SIZE, StreamFault
from .metadata import InvalidMetadata, MetadataError, decode_metadata, encode_metadata
from .states import Go, Input, RequestState, Reset, TunnelState

__all__ = ["TunnelServerProtocol", "parse_method_name"]

_SEND_HEADERS = Input.SEND_HEADERS
_SEND_MESSAGE = Input.SEND_MESSAGE
_CLOSE_STREAM = Input.CLOSE_STREAM
_MESSAGE = Input.RECV_REQUEST_MESSAGE
_MORE_DATA = Input.RECV_MORE_REQUEST_DATA
_HALF_CLOSE = Input.RECV_HALF_CLOSE
_CANCEL = Input.RECV_CANCEL
_WINDOW_UPDATE = Input.RECV_WINDOW_UPDATE
_SHUTTING_DOWN = TunnelState.SHUTTING_DOWN


def parse_method_name(name: str) -> str | None:
    """``/pkg.Service/Method`` (leading slash optional) in canonical form.

    Returns None for an ill-formed name.
    """
    parts = name[1:].split("/") if name.startswith("/") else name.split("/")
    if len(parts) != 2 or not all(parts):
        return None
    return f"/{parts[0]}/{parts[1]}"


class TunnelServerProtocol(Connection[ServerToClient]):
    """Sans-IO tunnel server: accept streams, read requests, send responses.

    ``methods`` maps the full method names served here to their cardinality.
    With a ``fallback`` cardinality, every other well-formed name is
    accepted too, with that cardinality (the application runs a fallback
    handler for it); without, such names are refused UNIMPLEMENTED.
    ``peer_negotiates`` says whether the tunnel client's side of the carrying
    call sent ``grpctunnel-negotiate: on``; then a ``Settings`` frame is the
    first frame queued.
    """

    _peer = "tunnel client"

    def __init__(
        self,
        methods: Mapping[str, Cardinality],
        *,
        peer_negotiates: bool,
        fallback: Cardinality | None = None,
        disable_flow_control: bool = False,
        max_receive_message_length: int = 4 * 1024 * 1024,
        max_metadata_size: int = 64 * 1024,
        initial_window_size: int = INITIAL_WINDOW_SIZE,
        max_window_size: int | None = None,
        max_concurrent_streams: int | None = None,
    ) -> None:
        super().__init__(
            max_receive_message_length=max_receive_message_length,
            max_metadata_size=max_metadata_size,
            initial_window_size=initial_window_size,
            max_window_size=max_window_size,
        )
        self._methods = methods
        #: Streams beyond this many at once are refused (None: no limit).
        self.max_concurrent_streams = max_concurrent_streams
        self._fallback = fallback
        self._supported = (
            (REVISION_ZERO,) if disable_flow_control else (REVISION_ZERO, REVISION_ONE)
        )
        if peer_negotiates:
            settings = Settings(
                supported_protocol_revisions=self._supported,
                initial_window_size=self.initial_window_size,
            )
            self._control.append(ServerToClient(stream_id=-1, settings=settings))

    # -- frame constructors ---------------------------------------------

    def message_frame(self, stream_id: int, size: int, data: bytes) -> ServerToClient:
        return ServerToClient(
            stream_id=stream_id, response_message=MessageData(size=size, data=data)
        )

    def more_data_frame(self, stream_id: int, data: bytes) -> ServerToClient:
        return ServerToClient(stream_id=stream_id, more_response_data=data)

    def _window_update(self, stream_id: int, n: int) -> ServerToClient:
        return ServerToClient(stream_id=stream_id, window_update=n)

    # -- the application's side ----------------------------------------

    def initiate_shutdown(self) -> None:
        """Refuse new streams with UNAVAILABLE; running ones go on."""
        if self.state is T_OPEN:
            self.state = _SHUTTING_DOWN

    def send_headers(self, stream_id: int, metadata: Iterable[tuple[str, str | bytes]]) -> None:
        """Queue the response headers.

        Raises ``MetadataError`` (nothing is queued) for metadata that cannot
        travel, and ``LocalProtocolError`` if headers were already sent.
        """
        allowed = self._call(stream_id, _SEND_HEADERS, response=True)
        if allowed is None:
            return
        st, step = allowed
        frame = ServerToClient(stream_id=stream_id)
        frame.response_headers.SetInParent()
        encode_metadata(metadata, frame.response_headers, limit=self.max_metadata_size)
        st.response = step.next
        self._queue(st, frame)

    def send_message(self, stream_id: int, data: bytes) -> None:
        """Queue one serialized response message (headers go first)."""
        allowed = self._call(stream_id, _SEND_MESSAGE, response=True)
        if allowed is None:
            return
        st, step = allowed
        if st.response is RESPONSE_OPEN:
            self._queue(st, _empty_headers(stream_id))
        st.response = step.next
        self._queue_message(st, data)

    def close_stream(
        self,
        stream_id: int,
        status: StatusProto | None,
        trailers: Iterable[tuple[str, str | bytes]] = (),
    ) -> None:
        """Queue the final frame of a stream; None is status OK.

        Raises ``MetadataError`` (nothing is queued, the stream stays open)
        for trailers that cannot travel; the caller then closes the stream
        again with an error status and no trailers.
        """
        allowed = self._call(stream_id, _CLOSE_STREAM, response=True)
        if allowed is None:
            return
        st, _ = allowed
        close = CloseStream()
        close.response_trailers.SetInParent()
        encode_metadata(trailers, close.response_trailers, limit=self.max_metadata_size)
        if status is not None and status.code:
            close.status.CopyFrom(status)
            self._count_failed(st)
        if st.response is RESPONSE_OPEN:
            self._queue(st, _empty_headers(stream_id))
        self._queue(st, ServerToClient(stream_id=stream_id, close_stream=close))
        self._end(st)

    # -- the peer's side -------------------------------------------------

    if TYPE_CHECKING:

        def receive_frame(self, frame: ClientToServer) -> list[Event]:
            """Process one frame from the tunnel client (``Connection.receive_frame``)."""
            ...

    def _no_stream(self, stream_id: int, kind: str | None, frame: ClientToServer) -> list[Event]:
        if kind != "new_stream":
            return super()._no_stream(stream_id, kind, frame)
        if stream_id <= self._last_id:
            raise RemoteProtocolError(
                f"tunnel client opened stream {stream_id}, which is not above "
                f"the last stream id {self._last_id}"
            )
        self._last_id = stream_id
        return self._open(stream_id, frame.new_stream)

    def _open(self, stream_id: int, new_stream: NewStream) -> list[Event]:
        name = new_stream.method_name
        method = parse_method_name(name)
        cardinality = self._lookup(method) if method is not None else None
        try:
            if self.state is _SHUTTING_DOWN:
                raise StreamFault(Status.UNAVAILABLE, "server is shutting down")
            if new_stream.protocol_revision not in self._supported:
                raise StreamFault(
                    Status.UNAVAILABLE,
                    f"unsupported protocol revision {new_stream.protocol_revision}",
                )
            if method is None:
                shown = name.lstrip("/") or repr(name)
                raise StreamFault(
                    Status.INVALID_ARGUMENT, f"{shown} is not a well-formed method name"
                )
            if cardinality is None:
                raise StreamFault(Status.UNIMPLEMENTED, f"{method[1:]} not implemented")
            limit = self.max_concurrent_streams
            if limit is not None and self.active_streams >= limit:
                raise StreamFault(
                    Status.RESOURCE_EXHAUSTED,
                    f"too many concurrent streams on this tunnel (the limit is {limit})",
                )
            metadata, timeout = self._request_headers(new_stream.request_headers)
        except StreamFault as fault:
            if method != KEEPALIVE_METHOD:
                self.counters.streams_opened += 1
                self.counters.streams_failed += 1
            refusal = ServerToClient(stream_id=stream_id)
            refusal.close_stream.status.code = fault.status.value
            refusal.close_stream.status.message = fault.message
            self._control.append(refusal)
            return []
        st = self._add_stream(
            stream_id,
            cardinality,
            response=RESPONSE_OPEN,
            send_window=new_stream.initial_window_size,
            flow_control=new_stream.protocol_revision == REVISION_ONE,
        )
        if cardinality in CLIENT_STREAMING:
            # Settings fixed every stream's first window; a grown one is
            # granted at once.
            grown = self._grow_at_start(st)
            if grown:
                self._control.append(self._window_update(stream_id, grown))
        self.counters.streams_opened += 1
        return [
            StreamOpened(
                stream_id=stream_id,
                method=method,
                metadata=metadata,
                timeout=timeout,
                cardinality=cardinality,
            )
        ]

    def _lookup(self, method: str) -> Cardinality | None:
        """The cardinality a stream of ``method`` is served with; None refuses it.

        The one place that decides which names this end serves: never the
        keepalive probe (refused like any unknown method, whatever is
        registered: answering it at once is all it asks for, and it must
        never reach an application's fallback); then the registered
        methods; then any other name if there is a fallback.
        """
        if method == KEEPALIVE_METHOD:
            return None
        cardinality = self._methods.get(method)
        return self._fallback if cardinality is None else cardinality

    def _request_headers(
        self, headers: Metadata
    ) -> tuple[tuple[tuple[str, str | bytes], ...], float | None]:
        try:
            metadata = decode_metadata(headers, limit=self.max_metadata_size)
        except InvalidMetadata as exc:
            # What no HTTP/2 peer could send is a protocol error, as in gRPC.
            raise StreamFault(Status.INTERNAL, f"bad request headers: {exc}") from None
        except MetadataError as exc:
            raise StreamFault(Status.INVALID_ARGUMENT, f"bad request headers: {exc}") from None
        timeout: float | None = None
        timeouts = headers.md.get("grpc-timeout")
        if timeouts is not None:
            try:
                # Several values: the earliest deadline wins, as in grpclib.
                timeout = min(decode_timeout(value) for value in timeouts.val)
            except ValueError:
                raise StreamFault(
                    Status.INVALID_ARGUMENT, f"invalid grpc-timeout header {list(timeouts.val)}"
                ) from None
        return metadata, timeout

    def _dispatch(
        self,
        st: Stream[ServerToClient],
        step: Go[RequestState],
        input_: Input,
        frame: ClientToServer,
    ) -> list[Event]:
        """A frame the table let through: check its bytes, then move on."""
        if input_ is _MESSAGE:
            envelope = frame.request_message
            complete = st.inbound.envelope(envelope.size, envelope.data)
            st.request = step.next
            return [self._data(st, envelope.data, complete)]
        if input_ is _MORE_DATA:
            complete = st.inbound.more(frame.more_request_data)
            return [self._data(st, frame.more_request_data, complete)]
        if input_ is _WINDOW_UPDATE:
            return self._window_opened(st, frame.window_update)
        if input_ is _HALF_CLOSE:
            if st.inbound.in_message:
                raise StreamFault(Status.INTERNAL, "half-close in the middle of a message")
            st.request = step.next
            return [HalfClosed(stream_id=st.id)]
        if input_ is _CANCEL:  # the stream is over already
            self._abandon(st)
            return []
        raise AssertionError(f"the state table let {input_.name} through on the server")

    def _abandon(self, st: Stream[ServerToClient]) -> None:
        """The client cancelled a stream whose ``close_stream`` is queued.

        The application is done with it, but responses may still wait for
        window the client will now never give: drop them, so the stream
        does not hold its data (and its table entry) for the tunnel's life.
        The queued ``close_stream`` still goes out; the client ignores it.
        """
        st.queue.drop_messages()
        self._schedule(st)
        if not st.queue and not st.scheduled:
            self._forget(st)

    def _stream_fault(self, st: Stream[ServerToClient], reset: Reset) -> StreamReset:
        """End a stream now: unsent responses are dropped, the status goes out.

        Response headers are not dropped: an accepted stream always gets
        headers before its ``close_stream`` (empty ones if the application
        sent none, as the reference does on a cancel); only streams refused
        at creation get a ``close_stream`` alone.
        """
        queue = st.queue
        head = queue.first()
        queue.clear()
        if st.response is RESPONSE_OPEN:
            queue.append(_empty_headers(st.id))
        elif isinstance(head, ServerToClient) and head.HasField("response_headers"):
            queue.append(head)  # queued, not yet sent
        close = ServerToClient(stream_id=st.id)
        close.close_stream.response_trailers.SetInParent()
        close.close_stream.status.code = reset.status.value
        close.close_stream.status.message = reset.message
        queue.append(close)
        self._schedule(st)
        self._count_failed(st)
        self._end(st)
        return StreamReset(stream_id=st.id, code=reset.status.value, message=reset.message)


def _empty_headers(stream_id: int) -> ServerToClient:
    frame = ServerToClient(stream_id=stream_id)
    frame.response_headers.SetInParent()
    return frame
