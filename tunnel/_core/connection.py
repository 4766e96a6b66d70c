"""What the tunnel client and the tunnel server have in common.

Both ends keep a table of streams, queue each stream's outgoing frames in its
own ``SendQueue``, check incoming chunks, give window back as the
application consumes data, and move each stream through the states of
``states.py``.  Only the frame types differ (the client sends
``ClientToServer``, the server ``ServerToClient``), so the subclasses supply
the few frame constructors and the handling of each input.

Which stream a frame is for.  A frame whose id is in the stream table is an
input of that stream, and its row in the state table decides.  Any other id
is routed here (``_no_stream``): an id this end has already seen (created,
refused, or over and forgotten) is late and ignored, because the peer may
well have sent it before it saw the stream end; an id it has never seen
ends the tunnel.

A stream's life in the table.  A stream enters when it is created and
counts as active (``active_streams``) until it is over.  An over stream
stays in the table while its last frames (a ``close_stream`` waiting behind
responses, a ``cancel``) are still queued, counted by ``backlog``, and
leaves when its queue is empty.

Outgoing frames are scheduled fairly: every stream has its own queue, and
``next_frame`` takes one frame from each stream with something to send in
turn, so one stream with a large backlog cannot delay the others by more than
one chunk per round.  Control frames that belong to no stream's ordering
(settings, window updates, refusals) go first.  Frames are produced only when
the writer asks for them, which is what keeps the round-robin honest: the
writer pulls the next frame when the carrying stream can take it.

When the peer breaks the tunnel's rules, ``receive_frame`` raises
``RemoteProtocolError`` and the object is ``FAILED`` for good
(``_fail_tunnel``; see ``states.py`` for what every later call does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message as _ProtoMessage
from grpclib.const import Cardinality

from ..errors import LocalProtocolError, RemoteProtocolError
from .events import DataReceived, Event
from .flow import MAX_WINDOW, InboundMessages, SendQueue, StreamFault
from .states import (
    FRAME_INPUTS,
    REQUEST,
    RESPONSE,
    Fatal,
    Go,
    Ignore,
    Input,
    Misuse,
    RequestState,
    Reset,
    ResponseState,
    Rules,
    TunnelFailedError,
    TunnelState,
    compile_rules,
)

__all__ = [
    "CLIENT_STREAMING",
    "COALESCE_AT",
    "GROWN_WINDOWS",
    "KEEPALIVE_METHOD",
    "SERVER_STREAMING",
    "Connection",
    "Counters",
    "Stream",
]

#: The method of a tunnel client's keepalive probe.  Nobody serves it: every
#: conforming tunnel server answers a stream for it at once with
#: ``close_stream`` (UNIMPLEMENTED), which is all a probe asks for.  Our
#: tunnel server refuses it before any handler or fallback could see it.
KEEPALIVE_METHOD = "/grpclib_tunnel.v1.Keepalive/Probe"

#: One window update per ``acknowledge`` (the reference sends one per chunk
#: consumed; our driver calls it once per stream per batch it writes, for
#: everything consumed since), until this many control frames wait to
#: leave; beyond it (the peer is not reading) each stream's queued update
#: grows instead of a new one queuing.
COALESCE_AT = 64

#: How many streams of one tunnel may hold a window grown all the way to
#: ``max_window_size`` at once: what growth may add to a tunnel's buffered
#: data is bounded by this many times the growth of one window, however many
#: streams the peer opens.
GROWN_WINDOWS = 4

#: The cardinalities in which the client, or the server, may send more
#: than one message: the streams whose windows may start grown.
CLIENT_STREAMING = frozenset({Cardinality.STREAM_UNARY, Cardinality.STREAM_STREAM})
SERVER_STREAMING = frozenset({Cardinality.UNARY_STREAM, Cardinality.STREAM_STREAM})

OutFrame = TypeVar("OutFrame", bound=_ProtoMessage)

# Enum members as module constants: attribute access on an enum class is slow.
REQUEST_OPEN = RequestState.OPEN
REQUEST_DONE = RequestState.DONE
REQUEST_OVER = RequestState.OVER
RESPONSE_IDLE = ResponseState.IDLE
RESPONSE_OPEN = ResponseState.OPEN
RESPONSE_OVER = ResponseState.OVER
T_OPEN = TunnelState.OPEN
T_FAILED = TunnelState.FAILED
NEW_STREAM_SENT = Input.NEW_STREAM_SENT


def _compile() -> dict[Cardinality, tuple[Rules[RequestState], Rules[ResponseState]]]:
    request = {unary: compile_rules(REQUEST, RequestState, unary=unary) for unary in (False, True)}
    response = {
        unary: compile_rules(RESPONSE, ResponseState, unary=unary) for unary in (False, True)
    }
    return {
        c: (request[not c.value.client_streaming], response[not c.value.server_streaming])
        for c in Cardinality
    }


#: The compiled rules of both halves, by the stream's cardinality.
RULES = _compile()
#: The row of a stream that is over (or gone): the same for every cardinality.
REQUEST_OVER_ROW = RULES[Cardinality.STREAM_STREAM][0][REQUEST_OVER]
RESPONSE_OVER_ROW = RULES[Cardinality.STREAM_STREAM][1][RESPONSE_OVER]


class Stream(Generic[OutFrame]):
    """Everything one end knows about one stream."""

    __slots__ = (
        "cardinality",
        "counted",
        "id",
        "inbound",
        "queue",
        "request",
        "request_rules",
        "response",
        "response_rules",
        "scheduled",
    )

    def __init__(
        self,
        stream_id: int,
        cardinality: Cardinality,
        response: ResponseState,
        queue: SendQueue[OutFrame],
        inbound: InboundMessages,
    ) -> None:
        self.id = stream_id
        self.cardinality = cardinality
        #: The state of each half, and the rules of each for this cardinality.
        self.request = REQUEST_OPEN
        self.response = response
        self.request_rules, self.response_rules = RULES[cardinality]
        #: What this end sends on the stream, in order, and its send window.
        self.queue = queue
        #: What the peer sends: message sizes and the receive window.
        self.inbound = inbound
        #: True while the stream sits in the round-robin ring.
        self.scheduled = False
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

    #: Who sends us frames, for messages.
    _peer = "peer"
    #: True on the tunnel client: the peer's frames are inputs of the
    #: response half (on the server, of the request half).
    _peer_sends_response = False

    def __init__(
        self,
        *,
        max_receive_message_length: int,
        max_metadata_size: int,
        initial_window_size: int,
        max_window_size: int | None = None,
    ) -> None:
        self.max_receive_message_length = max_receive_message_length
        self.max_metadata_size = max_metadata_size
        #: The window this end grants the peer on each stream (revision one).
        self.initial_window_size = initial_window_size
        #: How far a stream's window may grow (``acknowledge``): never
        #: below the initial window, which None (or any smaller value) keeps
        #: fixed, as the reference does.
        self.max_window_size = max(max_window_size or 0, initial_window_size)
        #: The window a stream grows to next: the tunnel learns it from
        #: streams that needed more, so that a new stream of a bulk
        #: transfer catches up at once instead of doubling from the start.
        self._window_target = initial_window_size
        #: What growth may still add across the tunnel's streams (bytes).
        self._growth_budget = GROWN_WINDOWS * (self.max_window_size - initial_window_size)
        #: The protocol object as a whole (``states.TunnelState``).
        self.state = TunnelState.OPEN
        #: Why the object is FAILED.
        self._failure: RemoteProtocolError | None = None
        self._streams: dict[int, Stream[OutFrame]] = {}
        # Lists, not deques, for the two queues: they are short but for a
        # peer that does not read (bounded by the driver's back-pressure),
        # and an empty deque costs 760 bytes, kept by every idle tunnel.
        self._control: list[OutFrame] = []
        #: The window_update frame of each stream still waiting in
        #: ``_control``, for coalescing under a backlog (``acknowledge``).
        self._queued_updates: dict[int, OutFrame] = {}
        self._ring: list[Stream[OutFrame]] = []
        #: The highest stream id created so far (ids only ever grow).
        self._last_id = 0
        #: Streams created and not over (a concurrency limit counts these).
        self.active_streams = 0
        #: Streams that are over and whose last frames are still queued.
        self._finishing = 0
        #: Counters for ``statistics`` (keepalive probes are not counted).
        self.counters = Counters()
        #: Keepalive probes among ``active_streams``.
        self._probes_active = 0

    # -- frame constructors supplied by each side (``flow.Framer``) ------

    def message_frame(self, stream_id: int, size: int, data: bytes) -> OutFrame:
        raise NotImplementedError

    def more_data_frame(self, stream_id: int, data: bytes) -> OutFrame:
        raise NotImplementedError

    def _window_update(self, stream_id: int, n: int) -> OutFrame:
        raise NotImplementedError

    # -- sending ---------------------------------------------------------

    def next_frame(self) -> OutFrame | None:
        """The next frame to write on the carrying stream, or None."""
        if self._control:
            control = self._control.pop(0)
            if self._queued_updates:
                sid: int = control.stream_id  # type: ignore[attr-defined]
                if self._queued_updates.get(sid) is control:
                    del self._queued_updates[sid]
            return control
        ring = self._ring
        while ring:
            st = ring.pop(0)
            queue = st.queue
            frame = queue.pop(self, st.id)
            if frame is None:
                # Its queue was emptied while it waited in the ring (a
                # cancel before new_stream went out): if it is over, this
                # was its last chance to leave the table.
                st.scheduled = False
                if st.response is RESPONSE_OVER and not queue:
                    self._forget(st)
                continue
            if st.response is RESPONSE_IDLE:
                # The first frame of a client's stream is its new_stream.
                self._announced(st)
            if queue.ready():
                ring.append(st)
            else:
                st.scheduled = False
                if st.response is RESPONSE_OVER and not queue:
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
        streams that are over are queued by the peer's own actions, not by
        an application that waits for its sends: when the peer stops
        reading, they are what would pile up.  The driver stops reading
        while this is high, so a peer cannot make us hold more than a
        bounded amount.
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
        return 0 if st is None else st.queue.buffered

    def send_window(self, stream_id: int) -> int:
        """The larger of a stream's initial send window and its window now.

        0 without flow control (revision zero) and for a stream not in the
        table.  How much a sender may queue before it waits scales with it
        (the driver's ``within_send_buffer``): with a peer that granted or
        grew a large window, a sender keeps it full.
        """
        st = self._streams.get(stream_id)
        if st is None:
            return 0
        queue = st.queue
        window = queue.window or 0
        initial = queue.initial_window
        return window if window > initial else initial

    def _announced(self, st: Stream[OutFrame]) -> None:
        """A client's new_stream left: the server may now speak of the stream."""
        step = st.response_rules[st.response][NEW_STREAM_SENT]
        assert isinstance(step, Go)
        st.response = step.next

    def _schedule(self, st: Stream[OutFrame]) -> None:
        if not st.scheduled and st.queue.ready():
            st.scheduled = True
            self._ring.append(st)

    def _queue(self, st: Stream[OutFrame], frame: OutFrame) -> None:
        st.queue.append(frame)
        self._schedule(st)

    def _queue_message(self, st: Stream[OutFrame], data: bytes) -> None:
        st.queue.append_message(data)
        counters = self.counters
        counters.messages_sent += 1
        counters.bytes_sent += len(data)
        self._schedule(st)

    # -- the stream table ------------------------------------------------

    def _add_stream(
        self,
        stream_id: int,
        cardinality: Cardinality,
        *,
        response: ResponseState,
        send_window: int,
        flow_control: bool,
    ) -> Stream[OutFrame]:
        """A new stream: windows under revision one, none under revision zero."""
        # Positional arguments: a class called with keywords costs much more.
        st: Stream[OutFrame] = Stream(
            stream_id,
            cardinality,
            response,
            SendQueue(send_window if flow_control else None),
            InboundMessages(
                self.max_receive_message_length,
                self.initial_window_size if flow_control else None,
            ),
        )
        self._streams[stream_id] = st
        self.active_streams += 1
        return st

    def _count_failed(self, st: Stream[OutFrame]) -> None:
        """Count a stream that ends with a status other than OK."""
        if st.counted:
            self.counters.streams_failed += 1

    def _end(self, st: Stream[OutFrame]) -> None:
        """The stream is over; it leaves the table once its queue is sent."""
        grown = st.inbound.size - self.initial_window_size
        if grown > 0:
            self._growth_budget += grown
        st.request = REQUEST_OVER
        st.response = RESPONSE_OVER
        self.active_streams -= 1
        self._finishing += 1
        if not st.counted:
            self._probes_active -= 1
        if not st.scheduled and not st.queue:
            self._forget(st)

    def _forget(self, st: Stream[OutFrame]) -> None:
        if self._streams.get(st.id) is st:
            del self._streams[st.id]
            self._finishing -= 1

    def is_open(self, stream_id: int) -> bool:
        """True while a stream is neither over nor unknown."""
        st = self._streams.get(stream_id)
        return st is not None and st.response is not RESPONSE_OVER

    # -- the application's calls -----------------------------------------

    def _call(
        self, stream_id: int, input_: Input, *, response: bool
    ) -> tuple[Stream[OutFrame], Go[Any]] | None:
        """The stream an application call names, and the row that lets it go.

        ``response`` says which half the call is an input of (the half this
        end sends).  Raises ``LocalProtocolError`` where the row refuses the
        call; returns None where the call does nothing (the row ignores it,
        or the stream ended with the tunnel).  The caller moves the state
        once the call's own checks passed.
        """
        st = self._streams.get(stream_id)
        if st is None:
            # Over and gone, or never created: the row of a stream that is
            # over decides.  After the tunnel failed, every call on a stream
            # it had raises, but a cancel: there is nothing left to cancel,
            # and the code that ends calls with the tunnel must not trip.
            if self.state is T_FAILED and stream_id <= self._last_id:
                if input_ is Input.CANCEL:
                    return None
                raise self._closed()
            step: object = (RESPONSE_OVER_ROW if response else REQUEST_OVER_ROW)[input_]
        elif response:
            step = st.response_rules[st.response][input_]
        else:
            step = st.request_rules[st.request][input_]
        if isinstance(step, Go):
            assert st is not None
            return st, step
        if isinstance(step, Misuse):
            raise LocalProtocolError(step.message.format(stream_id=stream_id))
        if isinstance(step, Ignore):
            return None
        raise AssertionError(f"the state table has no call rule here: {step!r}")

    # -- receiving -------------------------------------------------------

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of this stream's data.

        Under revision one this gives the window back to the peer with a
        ``window_update``, unless the peer cannot send on the stream any
        more (over, or half-closed by the peer): then nothing is sent.

        The update may grant more than ``n``: when the peer had used up
        nearly all of the stream's window (it sends faster than one window
        per round trip lets it) while the application kept up, the window
        grows (``_grow``).  A fixed 64 KiB window holds four chunks in
        flight, and a bulk sender then spends most of its time waiting for
        updates to come back through both event loops.  The peer only adds
        what it is granted (PROTOCOL.md), so this is invisible on the wire
        but for the sums.
        """
        st = self._streams.get(stream_id)
        if st is None or n <= 0:
            return
        if self._peer_sends_response:
            if st.response is RESPONSE_OVER:
                return
        elif st.request is not REQUEST_OPEN and st.request is not REQUEST_DONE:
            return  # half-closed by the peer, or over
        inbound = st.inbound
        window = inbound.window
        if window is None:
            return
        if window * 4 <= inbound.size < self.max_window_size:
            n += self._grow(inbound)
        inbound.grant(n)
        queued = self._queued_updates.get(stream_id)
        if queued is not None and len(self._control) > COALESCE_AT:
            # The peer is not reading: one update per stream, of the sum,
            # instead of one per chunk (the peer accepts any split).
            queued.window_update = min(queued.window_update + n, MAX_WINDOW)  # type: ignore[attr-defined]
            return
        frame = self._window_update(stream_id, n)
        self._queued_updates[stream_id] = frame
        self._control.append(frame)

    def _grow(self, inbound: InboundMessages) -> int:
        """Grow a stream's window towards the tunnel's target; return by how much.

        Called when the peer has at most a quarter of the stream's window
        left.  A stream already at the target doubles it (up to
        ``max_window_size``); a stream below it catches up at once.  What
        growth adds is taken from a budget that the stream gives back when
        it ends, so a peer that opens many streams does not make this end
        buffer more than ``GROWN_WINDOWS`` grown windows.
        """
        target = self._window_target
        if inbound.size >= target:
            target = self._window_target = min(2 * target, self.max_window_size)
        return self._grow_to(inbound, target)

    def _grow_to(self, inbound: InboundMessages, target: int) -> int:
        """Grow a window towards ``target`` as far as the budget allows."""
        extra = min(target - inbound.size, self._growth_budget)
        if extra <= 0 or inbound.window is None:
            return 0
        self._growth_budget -= extra
        inbound.grow(extra)
        return extra

    def _grow_at_start(self, st: Stream[OutFrame]) -> int:
        """Start a new stream with the window the tunnel learned; return the growth.

        Only for a stream whose peer sends a stream of messages: a client
        stream that sends 400 KB in a tunnel that learned 1 MiB windows
        would otherwise spend its first round trip on 64 KiB.  The caller
        tells the peer (a ``window_update``, or the client's ``NewStream``).
        """
        inbound = st.inbound
        extra = self._grow_to(inbound, self._window_target)
        inbound.grant(extra)
        return extra

    def _window_opened(self, st: Stream[OutFrame], n: int) -> list[Event]:
        """The peer consumed ``n`` bytes we sent on a stream.

        A stream that is over but still has frames queued (its
        ``close_stream`` waits behind responses) needs its window most of
        all, so the table honours window updates until it leaves.
        """
        queue = st.queue
        if queue.window is not None:
            queue.grant(n)
            self._schedule(st)
        return []

    def _no_stream(self, stream_id: int, kind: str | None, frame: Any) -> list[Event]:
        """A frame for an id not in the stream table: late, or made up.

        A ``window_update`` for any id up to the last one is late (a peer
        may grant window on a stream it just saw end); other frames are
        late only for an id that was really used.
        """
        if kind == "window_update":
            if stream_id <= self._last_id:
                return []
            raise RemoteProtocolError(
                f"window_update for stream {stream_id}, which was never opened"
            )
        if 0 < stream_id <= self._last_id:
            return []
        raise RemoteProtocolError(
            f"{self._peer} sent a {kind or 'empty'} frame for stream {stream_id}, "
            "which was never opened"
        )

    def receive_frame(self, frame: Any) -> list[Event]:
        """Process one frame from the peer.

        Raises ``RemoteProtocolError`` if the frame means the tunnel cannot
        go on (and every later frame raises it again); a fault of one stream
        ends that stream (``StreamEnded`` on the client, ``StreamReset`` on
        the server) and the tunnel lives on.
        """
        try:
            if self.state is not T_OPEN:
                events = self._not_open(frame)
                if events is not None:
                    return events
            kind = frame.WhichOneof("frame")
            stream_id = frame.stream_id
            st = self._streams.get(stream_id)
            if st is None or kind == "new_stream":
                return self._no_stream(stream_id, kind, frame)
            # The row of the half the peer sends decides, then the bytes.
            input_ = FRAME_INPUTS[kind]
            step: object
            if self._peer_sends_response:
                step = st.response_rules[st.response][input_]
            else:
                step = st.request_rules[st.request][input_]
            if isinstance(step, Go):
                try:
                    return self._dispatch(st, step, input_, frame)
                except StreamFault as fault:
                    return [self._stream_fault(st, Reset(fault.status, fault.message))]
            return self._refused(st, step, kind)
        except RemoteProtocolError as error:
            self._fail_tunnel(error)
            raise

    def _not_open(self, frame: Any) -> list[Event] | None:
        """A frame while the object is not OPEN; None: handle it as usual."""
        if self.state is T_FAILED:
            raise self._failed_again()
        return None

    def _refused(self, st: Stream[OutFrame], step: object, kind: str | None) -> list[Event]:
        """What a frame the table does not let through does."""
        if isinstance(step, Reset):
            return [self._stream_fault(st, step)]
        if isinstance(step, Ignore):
            return []
        if isinstance(step, Fatal):
            raise RemoteProtocolError(step.message.format(kind=kind or "empty", stream_id=st.id))
        raise AssertionError(f"the state table has no frame rule here: {step!r}")

    def _dispatch(
        self, st: Stream[OutFrame], step: Go[Any], input_: Input, frame: Any
    ) -> list[Event]:
        """A frame the table let through: check its bytes, then move on."""
        raise NotImplementedError

    def _stream_fault(self, st: Stream[OutFrame], reset: Reset) -> Event:
        """End a stream the peer broke (or cancelled), tunnel alive."""
        raise NotImplementedError

    def _data(self, st: Stream[OutFrame], data: bytes, complete: bool) -> DataReceived:
        """The event for a chunk of message data that passed its checks."""
        counters = self.counters
        counters.bytes_received += len(data)
        if complete:
            counters.messages_received += 1
        return DataReceived(stream_id=st.id, data=data, end_of_message=complete)

    # -- failure ---------------------------------------------------------

    def _fail_tunnel(self, error: RemoteProtocolError) -> None:
        """The peer broke the tunnel: every stream ends, nothing more is sent.

        Each stream that was still running counts as failed (it will end
        with UNAVAILABLE), and the object is FAILED for good.
        """
        if self.state is T_FAILED:
            return
        self.state = T_FAILED
        self._failure = error
        for st in self._streams.values():
            if st.response is not RESPONSE_OVER:
                self._count_failed(st)
            st.request = REQUEST_OVER
            st.response = RESPONSE_OVER
        self._streams.clear()
        self._ring.clear()
        self._control.clear()
        self._queued_updates.clear()
        self.active_streams = self._finishing = self._probes_active = 0

    def _failed_again(self) -> RemoteProtocolError:
        """What a frame that arrives after the failure raises."""
        error = RemoteProtocolError(f"the tunnel already failed: {self._failure}")
        error.__cause__ = self._failure
        return error

    def _closed(self) -> TunnelFailedError:
        """What a call that would start a stream after the failure raises."""
        return TunnelFailedError(f"tunnel closed: {self._failure}")
