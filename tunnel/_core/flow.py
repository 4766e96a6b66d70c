"""Per-stream flow control and message framing: plain arithmetic, no I/O.

Revision one of the protocol gives each direction of each stream a window
(HTTP/2 style).  Only message *data* counts: the ``data`` bytes of
``request_message``/``response_message`` and the ``more_*_data`` chunks.

Sending: a message is cut into chunks of at most ``MAX_CHUNK`` bytes and, under
revision one, of at most the current send window.  The first chunk travels in
an envelope that states the size of the whole message.

Receiving: the arrival of each chunk is checked against the window and the
message's stated size; a receiver gives window back (``window_update``) only
when the application consumes a chunk, so a peer can never have more than one
window of unconsumed data buffered per stream.  The claimed size of a message
is checked against the receive limit when its envelope arrives, so nothing is
ever allocated or buffered for a message that is too large.
"""

from __future__ import annotations

from grpclib.const import Status

__all__ = [
    "INITIAL_WINDOW_SIZE",
    "MAX_CHUNK",
    "MAX_WINDOW",
    "InboundMessages",
    "OutboundMessage",
    "StreamFault",
]

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
    """One message waiting to be cut into frames."""

    __slots__ = ("_data", "_offset", "started")

    def __init__(self, data: bytes) -> None:
        self._data = memoryview(data)
        self._offset = 0
        self.started = False

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def remaining(self) -> int:
        return len(self._data) - self._offset

    def take(self, limit: int) -> bytes:
        """The next chunk of at most ``limit`` bytes."""
        end = self._offset + min(limit, MAX_CHUNK)
        chunk = bytes(self._data[self._offset : end])
        self._offset += len(chunk)
        self.started = True
        return chunk


class InboundMessages:
    """Checks arriving message chunks against the window and stated sizes.

    ``window`` is None under revision zero (no flow control).
    """

    __slots__ = ("_limit", "_remaining", "messages_started", "window")

    def __init__(self, *, limit: int, window: int | None) -> None:
        self._limit = limit
        self._remaining = 0
        self.messages_started = 0
        self.window = window

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
        self.messages_started += 1
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
