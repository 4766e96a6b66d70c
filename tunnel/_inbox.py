"""Received message chunks of one stream, reassembled as the application reads.

Window is given back chunk by chunk as the application *reads* (the reference
does the same), not as chunks arrive: that is what bounds what a peer can
make us buffer to one window per stream.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

__all__ = ["Inbox"]


def _nothing(n: int) -> None:
    del n


class Inbox:
    """The chunks of one stream not yet read, and the message being assembled."""

    __slots__ = ("_chunks", "_partial", "acknowledge")

    def __init__(self, acknowledge: Callable[[int], None] = _nothing) -> None:
        self._chunks: deque[tuple[bytes, bool]] = deque()
        self._partial: list[bytes] = []
        #: Called with the length of each chunk the application consumes.
        self.acknowledge = acknowledge

    def put(self, data: bytes, end_of_message: bool) -> None:
        self._chunks.append((data, end_of_message))

    def take(self) -> bytes | None:
        """The next whole message, or None if it has not all arrived yet."""
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

    def clear(self) -> None:
        """Drop what is unread; the stream is over, so no window goes back."""
        self._chunks.clear()
        self._partial.clear()
