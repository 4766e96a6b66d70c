"""A transport that sends what was written to it in one event-loop iteration as one write.

grpclib writes to its socket for every HTTP/2 frame it produces: a call's
headers, each message and its trailers are one ``send()`` each, and so is
every acknowledgement of received data.  On loopback each of them is a
system call on this side and, as often, a wake-up, a ``recv()`` and a pass
through h2 on the other.  A proxy relays several such frames per call on
each of its two connections, in the same event-loop iteration more often
than not: the response headers, the message and the trailers of a unary
call, or the frames of many calls at once under load.

``CoalescingTransport`` wraps the asyncio transport of one connection.
``write()`` keeps the data, and the first write after a flush schedules the
next flush with ``loop.call_soon``: whatever the callbacks and tasks that
run before it write goes out with it, in one ``write()`` of the real
transport.  Nothing is held past the callbacks the loop had already
scheduled, and the loop never waits for I/O while data is pending (a
scheduled callback makes its next poll return at once), so no frame is
delayed by more than that.

What stays as it was:

* back-pressure: once ``FLUSH_AT`` bytes are pending they are written at
  once, so the real transport's buffer limits, and the ``pause_writing``
  they call on the protocol, apply as before to within that much data;
* order: data leaves in the order it was written, and ``close()`` writes
  what is pending before closing (as the real transport sends its buffer
  before it closes); ``abort()`` drops it, as the real one drops its buffer;
* everything else (``get_extra_info``, ``is_closing``, reading) is the
  real transport's.
"""

from __future__ import annotations

import asyncio
from typing import Any

__all__ = ["FLUSH_AT", "CoalescingTransport"]

#: Pending bytes written at once rather than at the end of the iteration:
#: the default high-water mark of asyncio's transports.
FLUSH_AT = 65_536


class CoalescingTransport(asyncio.Transport):
    """``transport``, with the writes of one loop iteration sent as one."""

    def __init__(self, transport: asyncio.Transport) -> None:
        super().__init__()
        self._transport = transport
        self._loop = asyncio.get_running_loop()
        self._pending: list[bytes | bytearray | memoryview] = []
        self._pending_size = 0
        self._scheduled = False

    # -- writing -------------------------------------------------------------

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if not data:
            return
        self._pending.append(data)
        self._pending_size += len(data)
        if self._pending_size >= FLUSH_AT:
            self.flush()
        elif not self._scheduled:
            self._scheduled = True
            self._loop.call_soon(self._scheduled_flush)

    def writelines(self, list_of_data: Any) -> None:
        for data in list_of_data:
            self.write(data)

    def _scheduled_flush(self) -> None:
        self._scheduled = False
        self.flush()

    def flush(self) -> None:
        """Write what is pending now."""
        pending = self._pending
        if not pending:
            return
        data = pending[0] if len(pending) == 1 else b"".join(pending)
        pending.clear()
        self._pending_size = 0
        self._transport.write(data)

    def get_write_buffer_size(self) -> int:
        return self._pending_size + self._transport.get_write_buffer_size()

    def get_write_buffer_limits(self) -> tuple[int, int]:
        return self._transport.get_write_buffer_limits()

    def set_write_buffer_limits(self, high: int | None = None, low: int | None = None) -> None:
        self._transport.set_write_buffer_limits(high, low)

    def can_write_eof(self) -> bool:
        return self._transport.can_write_eof()

    def write_eof(self) -> None:
        self.flush()
        self._transport.write_eof()

    # -- closing ---------------------------------------------------------------

    def close(self) -> None:
        self.flush()
        self._transport.close()

    def abort(self) -> None:
        self._pending.clear()
        self._pending_size = 0
        self._transport.abort()

    def is_closing(self) -> bool:
        return self._transport.is_closing()

    # -- the rest is the real transport's ------------------------------------------

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self._transport.get_extra_info(name, default)

    def pause_reading(self) -> None:
        self._transport.pause_reading()

    def resume_reading(self) -> None:
        self._transport.resume_reading()

    def is_reading(self) -> bool:
        return self._transport.is_reading()

    def set_protocol(self, protocol: asyncio.BaseProtocol) -> None:
        self._transport.set_protocol(protocol)

    def get_protocol(self) -> asyncio.BaseProtocol:
        return self._transport.get_protocol()
