"""Received message chunks of one stream, reassembled as the application reads.

Window is given back chunk by chunk as the application *reads* (the reference
does the same), not as chunks arrive: that is what bounds what a peer can
make us buffer to one window per stream.

An application waiting in ``recv_message`` is reading: while it waits
(``reading``), a chunk that arrives is consumed at once, appended to the
message being assembled with its window given back, and the application is
woken only when the message is whole.  A large message then costs no
wake-up of the application per chunk, and its window goes back as soon as
the tunnel's reader has the chunk.  This buffers nothing the application
would not hold itself after waking: the message being assembled (bounded by
the receive limit, as before), and at most one whole message, after which
chunks wait unconsumed again until the application reads.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["Inbox"]


def _nothing(n: int) -> None:
    del n


class Inbox:
    """The chunks of one stream not yet read, and the message being assembled."""

    __slots__ = ("_chunks", "_partial", "_whole", "acknowledge", "reading")

    def __init__(self, acknowledge: Callable[[int], None] = _nothing) -> None:
        self._chunks: deque[tuple[bytes, bool]] = deque()
        self._partial: list[bytes] = []
        #: A message completed while the application was waiting, not yet taken.
        self._whole: bytes | None = None
        #: Called with the length of each chunk the application consumes.
        self.acknowledge = acknowledge
        #: True while the application waits for a message (see the module).
        self.reading = False

    def put(self, data: bytes, end_of_message: bool) -> bool:
        """Add an arrived chunk; True if a waiting application should wake up."""
        if not self.reading or self._chunks:
            self._chunks.append((data, end_of_message))
            return True
        self.acknowledge(len(data))
        partial = self._partial
        if not end_of_message:
            partial.append(data)
            return False
        if partial:
            partial.append(data)
            data = b"".join(partial)
            partial.clear()
        self._whole = data
        self.reading = False  # one whole message at most: the rest waits
        return True

    def take(self) -> bytes | None:
        """The next whole message, or None if it has not all arrived yet."""
        whole = self._whole
        if whole is not None:
            self._whole = None
            return whole
        chunks = self._chunks
        partial = self._partial
        while chunks:
            data, last = chunks.popleft()
            self.acknowledge(len(data))
            if last:
                if partial:
                    partial.append(data)
                    data = b"".join(partial)
                    partial.clear()
                return data
            partial.append(data)
        return None

    def discard(self) -> None:
        """Drop what is unread, giving its window back (nobody will read it)."""
        while self._chunks:
            data, _ = self._chunks.popleft()
            self.acknowledge(len(data))
        self._partial.clear()
        self._whole = None

    def clear(self) -> None:
        """Drop what is unread; the stream is over, so no window goes back."""
        self._chunks.clear()
        self._partial.clear()
        self._whole = None
