"""What the tunnel client and the tunnel server have in common.

Both ends keep a table of active streams, cut outgoing messages into chunks
under each stream's send window, check incoming chunks, and give window back
as the application consumes data.  Only the frame types differ (the client
sends ``ClientToServer``, the server ``ServerToClient``), so the subclasses
supply the few frame constructors and the dispatch of incoming frames.

Outgoing frames are scheduled fairly: every stream has its own queue, and
``next_frame`` takes one frame from each stream with something to send in
turn, so one stream with a large backlog cannot delay the others by more than
one chunk per round.  Control frames that belong to no stream's ordering
(settings, window updates, refusals) go first.  Frames are produced only when
the writer asks for them, which is what keeps the round-robin honest: the
writer pulls the next frame when the carrying stream can take it.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import Generic, TypeVar

from google.protobuf.message import Message as _ProtoMessage
from grpclib.const import Cardinality

from ..errors import LocalProtocolError, RemoteProtocolError
from .events import DataReceived, Event
from .flow import MAX_WINDOW, InboundMessages, OutboundMessage

__all__ = ["KEEPALIVE_METHOD", "Connection", "Counters", "StreamState"]

#: The method of a tunnel client's keepalive probe.  Nobody serves it: every
#: conforming tunnel server answers a stream for it at once with
#: ``close_stream`` (UNIMPLEMENTED), which is all a probe asks for.  Our
#: tunnel server refuses it before any handler or fallback could see it.
KEEPALIVE_METHOD = "/grpclib_tunnel.v1.Keepalive/Probe"

#: Window updates are sent one per chunk consumed, as the reference does,
#: until this many control frames wait to leave; beyond it (the peer is not
#: reading) each stream's queued update grows instead of a new one queuing.
COALESCE_AT = 64

OutFrame = TypeVar("OutFrame", bound=_ProtoMessage)


class StreamState:
    """Everything one end knows about one stream."""

    __slots__ = (
        "buffered",
        "cardinality",
        "counted",
        "finished",
        "headers_done",
        "id",
        "inbound",
        "pending",
        "receiving",
        "scheduled",
        "send_window",
        "sending",
        "sent_messages",
    )

    def __init__(
        self,
        stream_id: int,
        cardinality: Cardinality,
        *,
        send_window: int | None,
        inbound: InboundMessages,
    ) -> None:
        self.id = stream_id
        self.cardinality = cardinality
        #: None under revision zero: no flow control.
        self.send_window = send_window
        self.inbound = inbound
        #: Frames (or messages still to be cut into frames) in send order.
        self.pending: deque[object] = deque()
        #: True while the stream sits in the round-robin ring.
        self.scheduled = False
        #: Client: response headers arrived.  Server: response headers queued.
        self.headers_done = False
        #: This end may still send messages.
        self.sending = True
        #: The peer may still send messages.
        self.receiving = True
        #: The stream is over; late frames for it are ignored.
        self.finished = False
        #: Messages this end has queued on the stream.
        self.sent_messages = 0
        #: Bytes of queued message data not yet cut into frames.
        self.buffered = 0
        #: False for a keepalive probe, which the statistics leave out.
        self.counted = True


@dataclass(slots=True)
class Counters:
    """What a tunnel carried so far, counted by its protocol object."""

    #: Streams the tunnel client started (on the server: accepted or refused).
    streams_opened: int = 0
    #: Streams that ended with a status other than OK (refusals included).
    streams_failed: int = 0
    #: Whole messages, and bytes of message data, each way.
    messages_sent: int = 0
    messages_received: int = 0
    bytes_sent: int = 0
    bytes_received: int = 0


class Connection(Generic[OutFrame]):
    """Stream table, fair scheduling of outgoing frames, and flow control."""

    def __init__(
        self,
        *,
        max_receive_message_length: int,
        max_metadata_size: int,
        initial_window_size: int,
    ) -> None:
        self.max_receive_message_length = max_receive_message_length
        self.max_metadata_size = max_metadata_size
        #: The window this end grants the peer on each stream (revision one).
        self.initial_window_size = initial_window_size
        self._streams: dict[int, StreamState] = {}
        self._control: deque[OutFrame] = deque()
        #: The window_update frame of each stream still waiting in
        #: ``_control``, for coalescing under a backlog (``acknowledge``).
        self._queued_updates: dict[int, OutFrame] = {}
        self._ring: deque[StreamState] = deque()
        #: The highest stream id created so far (ids only ever grow).
        self._last_id = 0
        #: Streams created and not finished (a concurrency limit counts these).
        self.active_streams = 0
        #: Finished streams whose last frames are still queued.
        self._finishing = 0
        #: Counters for ``statistics`` (keepalive probes are not counted).
        self.counters = Counters()
        #: Keepalive probes among ``active_streams``.
        self._probes_active = 0

    # -- frame constructors supplied by each side ------------------------

    def _first_chunk(self, stream_id: int, size: int, data: bytes) -> OutFrame:
        raise NotImplementedError

    def _more_data(self, stream_id: int, data: bytes) -> OutFrame:
        raise NotImplementedError

    def _window_update(self, stream_id: int, n: int) -> OutFrame:
        raise NotImplementedError

    # -- sending ---------------------------------------------------------

    def next_frame(self) -> OutFrame | None:
        """The next frame to write on the carrying stream, or None."""
        if self._control:
            control = self._control.popleft()
            if self._queued_updates:
                sid: int = control.stream_id  # type: ignore[attr-defined]
                if self._queued_updates.get(sid) is control:
                    del self._queued_updates[sid]
            return control
        ring = self._ring
        while ring:
            st = ring.popleft()
            frame = self._pop_frame(st)
            if frame is None:
                # Its queue was emptied while it waited in the ring (a
                # cancel before new_stream went out): if it is over, this
                # was its last chance to leave the table.
                st.scheduled = False
                if st.finished and not st.pending:
                    self._forget(st)
                continue
            if st.pending and self._can_send(st):
                ring.append(st)
            else:
                st.scheduled = False
                if st.finished and not st.pending:
                    self._forget(st)
            return frame
        return None

    @property
    def streams_in_use(self) -> int:
        """Active streams, keepalive probes left out (for statistics)."""
        return self.active_streams - self._probes_active

    def backlog(self) -> int:
        """Frames waiting to leave that no sender is holding back.

        Control frames (refusals, window updates) and the last frames of
        finished streams are queued by the peer's own actions, not by an
        application that waits for its sends: when the peer stops reading,
        they are what would pile up.  The driver stops reading while this
        is high, so a peer cannot make us hold more than a bounded amount.
        """
        return len(self._control) + self._finishing

    def has_frames(self) -> bool:
        """True if ``next_frame`` may return a frame.

        Cheap on purpose (it runs after every frame received): a stream in
        the round-robin ring had something to send when it was put there; if
        a cancel emptied it since, ``next_frame`` just passes it by.
        """
        return bool(self._control) or bool(self._ring)

    def buffered_message_bytes(self, stream_id: int) -> int:
        """Bytes of message data queued on a stream and not yet framed.

        The adapter uses this for back-pressure: a send waits while its
        stream has more than a small budget of data queued.
        """
        st = self._streams.get(stream_id)
        return 0 if st is None else st.buffered

    def _pop_frame(self, st: StreamState) -> OutFrame | None:
        if not st.pending:
            return None
        head = st.pending[0]
        if not isinstance(head, OutboundMessage):
            st.pending.popleft()
            return head  # type: ignore[return-value]
        remaining = head.remaining
        if st.send_window is None:
            limit = remaining
        else:
            limit = min(st.send_window, remaining)
            if limit == 0 and remaining:
                return None  # blocked until a window_update arrives
        first = not head.started
        chunk = head.take(limit)
        st.buffered -= len(chunk)
        if st.send_window is not None:
            st.send_window -= len(chunk)
        if not head.remaining:
            st.pending.popleft()
        if first:
            return self._first_chunk(st.id, head.size, chunk)
        return self._more_data(st.id, chunk)

    @staticmethod
    def _can_send(st: StreamState) -> bool:
        if not st.pending:
            return False
        head = st.pending[0]
        return not (
            isinstance(head, OutboundMessage)
            and head.remaining
            and st.send_window is not None
            and st.send_window <= 0
        )

    def _schedule(self, st: StreamState) -> None:
        if not st.scheduled and self._can_send(st):
            st.scheduled = True
            self._ring.append(st)

    def _queue(self, st: StreamState, frame: OutFrame) -> None:
        st.pending.append(frame)
        self._schedule(st)

    def _queue_message(self, st: StreamState, data: bytes) -> None:
        st.pending.append(OutboundMessage(data))
        st.buffered += len(data)
        counters = self.counters
        counters.messages_sent += 1
        counters.bytes_sent += len(data)
        self._schedule(st)

    def _data(self, st: StreamState, data: bytes, complete: bool) -> DataReceived:
        """The event for a chunk of message data that passed its checks."""
        counters = self.counters
        counters.bytes_received += len(data)
        if complete:
            counters.messages_received += 1
        return DataReceived(st.id, data, complete)

    def _failed(self, st: StreamState) -> None:
        """Count a stream that ends with a status other than OK."""
        if st.counted and not st.finished:
            self.counters.streams_failed += 1

    def _finish(self, st: StreamState, *, drop_pending: bool) -> None:
        """Mark a stream over; it leaves the table once its queue is sent."""
        if not st.finished:
            self.active_streams -= 1
            self._finishing += 1
            if not st.counted:
                self._probes_active -= 1
        st.finished = True
        st.sending = False
        st.receiving = False
        if drop_pending:
            st.pending.clear()
            st.buffered = 0
        if not st.pending and not st.scheduled:
            self._forget(st)

    def _forget(self, st: StreamState) -> None:
        if self._streams.get(st.id) is st:
            del self._streams[st.id]
            if st.finished:
                self._finishing -= 1

    def _add_stream(
        self,
        stream_id: int,
        cardinality: Cardinality,
        *,
        send_window: int,
        flow_control: bool,
    ) -> StreamState:
        """A new stream: windows under revision one, none under revision zero."""
        st = StreamState(
            stream_id,
            cardinality,
            send_window=send_window if flow_control else None,
            inbound=InboundMessages(
                limit=self.max_receive_message_length,
                window=self.initial_window_size if flow_control else None,
            ),
        )
        self._streams[stream_id] = st
        self.active_streams += 1
        return st

    def is_open(self, stream_id: int) -> bool:
        """True while a stream is neither finished nor unknown."""
        st = self._streams.get(stream_id)
        return st is not None and not st.finished

    def _active(self, stream_id: int) -> StreamState:
        """The stream the application names, which must still be usable."""
        st = self._streams.get(stream_id)
        if st is None or st.finished:
            raise LocalProtocolError(f"stream {stream_id} is not active")
        return st

    # -- receiving -------------------------------------------------------

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of this stream's data.

        Under revision one this gives the window back to the peer with a
        ``window_update``, unless the peer cannot send on the stream any
        more (finished, or half-closed by the peer): then nothing is sent.
        """
        st = self._streams.get(stream_id)
        if st is None or st.finished or not st.receiving or n <= 0:
            return
        if st.inbound.window is None:
            return
        st.inbound.grant(n)
        queued = self._queued_updates.get(stream_id)
        if queued is not None and len(self._control) > COALESCE_AT:
            # The peer is not reading: one update per stream, of the sum,
            # instead of one per chunk (the peer accepts any split).
            queued.window_update = min(queued.window_update + n, MAX_WINDOW)  # type: ignore[attr-defined]
            return
        frame = self._window_update(stream_id, n)
        self._queued_updates[stream_id] = frame
        self._control.append(frame)

    def _window_update_received(self, stream_id: int, n: int) -> list[Event]:
        """The peer consumed ``n`` bytes we sent on a stream.

        A stream that is over but still has responses queued (its
        ``close_stream`` waits behind them) needs its window most of all, so
        window updates are honoured until the stream leaves the table.  For
        any other unknown stream the update is late and ignored: it cannot
        hurt, and the peer may well have sent it before seeing our close.
        """
        st = self._streams.get(stream_id)
        if st is None or st.send_window is None:
            if stream_id > self._last_id:
                raise RemoteProtocolError(
                    f"window_update for stream {stream_id}, which was never opened"
                )
            return []  # late, or revision zero: nothing to open
        st.send_window = min(st.send_window + n, MAX_WINDOW)
        self._schedule(st)
        return []

    def _protocol_stream(self, stream_id: int) -> StreamState | None:
        """The stream a peer's frame names, or None if the frame is late."""
        st = self._streams.get(stream_id)
        if st is None or st.finished:
            return None
        return st
