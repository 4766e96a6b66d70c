"""Per-stream flow control and message framing: plain arithmetic, no I/O.

Revision one of the protocol gives each direction of each stream a window
(HTTP/2 style).  Only message *data* counts: the ``data`` bytes of
``request_message``/``response_message`` and the ``more_*_data`` chunks.

Sending (``SendQueue``): each stream's outgoing frames wait in its own queue,
in the order they must leave.  A message is queued whole and cut into chunks
only as the writer pulls them: chunks of at most ``MAX_CHUNK`` bytes and,
under revision one, of at most the current send window, so a message waits
in the queue (not in frames) while the window is shut.  The first chunk
travels in an envelope that states the size of the whole message.  The
queue keeps the count of message bytes not yet cut into frames, which is
what a sender waits on (back-pressure).

Receiving (``InboundMessages``): the arrival of each chunk is checked
against the window and the message's stated size; a receiver gives window
back (``window_update``) only when the application consumes a chunk, so a
peer can never have more than one window of unconsumed data buffered per
stream.  The window a stream was granted (``size``) may grow while the
application keeps up with a peer that fills it (``Connection.acknowledge``
decides; the bytes are counted here).  The claimed size of a message is
checked against the receive limit when its envelope arrives, so nothing is
ever allocated or buffered for a message that is too large.

These checks are about bytes; whether a message may arrive at all in a
stream's state is the state table's business (``states.py``).
"""

from __future__ import annotations

from collections import deque
from typing import Generic, Protocol, TypeVar

from grpclib.const import Status

__all__ = [
    "INITIAL_WINDOW_SIZE",
    "MAX_CHUNK",
    "MAX_WINDOW",
    "Framer",
    "InboundMessages",
    "OutboundMessage",
    "SendQueue",
    "StreamFault",
]

F = TypeVar("F")
F_co = TypeVar("F_co", covariant=True)

#: The largest chunk of message data one frame carries.
MAX_CHUNK = 16_384
#: The window each end grants per stream (the reference's value).
INITIAL_WINDOW_SIZE = 65_536
#: Window updates are capped here instead of failing the stream: a peer that
#: grants more than this gains nothing, and nothing can overflow.
MAX_WINDOW = 2**31 - 1


class StreamFault(Exception):
    """The peer broke a rule that confines the damage to one stream."""

    def __init__(self, status: Status, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.message = message


class OutboundMessage:
    """One message waiting to be cut into frames.

    Each chunk is a slice of the message's bytes: one copy, which the frame
    needs anyway (protobuf takes ``bytes``), and none at all for a message
    that fits in one chunk (a slice of all of a ``bytes`` is the object itself).
    """

    __slots__ = ("_data", "_offset", "remaining", "size")

    def __init__(self, data: bytes) -> None:
        self._data = data if type(data) is bytes else bytes(data)
        self._offset = 0
        #: The size of the whole message, and the bytes not yet taken.
        self.size = self.remaining = len(data)

    def take(self, limit: int) -> bytes:
        """The next chunk of at most ``limit`` bytes."""
        start = self._offset
        n = min(limit, MAX_CHUNK, self.remaining)
        self._offset = start + n
        self.remaining -= n
        return self._data[start : start + n]


class Framer(Protocol[F_co]):
    """What turns a chunk of a message into a frame (each end's frame type)."""

    def message_frame(self, stream_id: int, size: int, data: bytes) -> F_co:
        """The first chunk, in an envelope that states the whole size."""
        ...

    def more_data_frame(self, stream_id: int, data: bytes) -> F_co:
        """A continuation chunk."""
        ...


class SendQueue(Generic[F]):
    """One stream's outgoing frames in send order, and what holds them back.

    Frames go in whole (``append``); messages go in with ``append_message``
    and come out as chunks (``pop``), so the queue alone counts the message
    bytes not yet framed (``buffered``).  ``window`` is the stream's send
    window (None under revision zero: no flow control); only message data
    uses it up, and a chunk never takes more than it allows.
    ``initial_window`` is the window the peer granted at the start (0
    under revision zero).
    """

    __slots__ = ("_items", "buffered", "initial_window", "window")

    def __init__(self, window: int | None) -> None:
        self._items: deque[F | OutboundMessage] = deque()
        self.buffered = 0
        self.window = window
        self.initial_window = window or 0

    def __len__(self) -> int:
        return len(self._items)

    def append(self, frame: F) -> None:
        self._items.append(frame)

    def append_message(self, data: bytes) -> None:
        self._items.append(OutboundMessage(data))
        self.buffered += len(data)

    def first(self) -> F | OutboundMessage | None:
        """The item that leaves next, if any."""
        return self._items[0] if self._items else None

    def ready(self) -> bool:
        """True if ``pop`` would return a frame (not empty, window open)."""
        items = self._items
        if not items:
            return False
        head = items[0]
        window = self.window
        return (
            not isinstance(head, OutboundMessage)
            or window is None
            or window > 0
            or not head.remaining
        )

    def pop(self, framer: Framer[F], stream_id: int) -> F | None:
        """The next frame to send, or None if empty or held back by the window."""
        items = self._items
        if not items:
            return None
        message = items[0]
        if not isinstance(message, OutboundMessage):
            items.popleft()
            return message
        remaining = message.remaining
        window = self.window
        if window is None:
            limit = remaining
        else:
            limit = window if window < remaining else remaining
            if limit == 0 and remaining:
                return None  # blocked until a window_update arrives
        first = remaining == message.size
        chunk = message.take(limit)
        taken = len(chunk)
        self.buffered -= taken
        if window is not None:
            self.window = window - taken
        if not message.remaining:
            items.popleft()
        if first:
            return framer.message_frame(stream_id, message.size, chunk)
        return framer.more_data_frame(stream_id, chunk)

    def grant(self, n: int) -> None:
        """The peer gave ``n`` bytes of window back (capped at ``MAX_WINDOW``)."""
        if self.window is not None:
            self.window = min(self.window + n, MAX_WINDOW)

    def clear(self) -> None:
        """Drop everything queued."""
        self._items.clear()
        self.buffered = 0

    def drop_messages(self) -> None:
        """Drop queued message data, keep the frames (a final status, say)."""
        kept = [item for item in self._items if not isinstance(item, OutboundMessage)]
        self._items.clear()
        self._items.extend(kept)
        self.buffered = 0


class InboundMessages:
    """Checks arriving message chunks against the window and stated sizes.

    ``window`` is what the peer may still send, None under revision zero
    (no flow control); ``size`` is the whole window granted to the stream:
    the initial window, plus what it grew by (``grow``).
    """

    __slots__ = ("_limit", "_remaining", "size", "window")

    def __init__(self, limit: int, window: int | None) -> None:
        self._limit = limit
        self._remaining = 0
        self.window = window
        self.size = window or 0

    @property
    def in_message(self) -> bool:
        """True between a message's envelope and its last chunk."""
        return self._remaining > 0

    def envelope(self, size: int, data: bytes) -> bool:
        """A message starts; returns True if ``data`` completes it."""
        if self._remaining:
            raise StreamFault(
                Status.INTERNAL, "a new message began before the previous one was complete"
            )
        if size > self._limit:
            raise StreamFault(
                Status.RESOURCE_EXHAUSTED,
                f"received message larger than max ({size} vs. {self._limit})",
            )
        self._remaining = size
        return self._chunk(data)

    def more(self, data: bytes) -> bool:
        """A continuation chunk; returns True if it completes the message."""
        if not self._remaining:
            raise StreamFault(Status.INTERNAL, "message data arrived outside of a message")
        return self._chunk(data)

    def _chunk(self, data: bytes) -> bool:
        n = len(data)
        if n > self._remaining:
            raise StreamFault(
                Status.INTERNAL, "message data exceeds the size stated in its envelope"
            )
        if self.window is not None:
            if n > self.window:
                raise StreamFault(
                    Status.RESOURCE_EXHAUSTED,
                    "peer sent more data than the flow-control window allows",
                )
            self.window -= n
        self._remaining -= n
        return self._remaining == 0

    def grant(self, n: int) -> None:
        """Give ``n`` bytes of window back (the application consumed them)."""
        if self.window is not None:
            self.window = min(self.window + n, MAX_WINDOW)

    def grow(self, n: int) -> None:
        """Count ``n`` more bytes of window granted to the stream.

        The window itself opens when they are granted with the consumed
        bytes (``grant``), in the same update.
        """
        if self.window is not None:
            self.size += n
