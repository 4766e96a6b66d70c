"""The asyncio driver of one tunnel: it moves frames, nothing else.

One task reads frames from the carrying gRPC stream and feeds them to the
protocol core; one task writes what the core has queued.  The writer pulls
the frames the core has ready when the carrying stream has taken the
previous batch, so the core's round-robin across streams decides who goes
next, and a stream's ``send_message`` waits while the stream has more than
a window of data queued (back-pressure).  What the application consumed
goes back to the core once per stream per batch (``acknowledge``).

The driver knows nothing of calls or handlers: subclasses turn the core's
events into those, and decide what the end of the carrying stream means.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Generic, TypeVar

from google.protobuf.message import Message

from ._core.connection import Connection
from ._core.events import Event
from ._tasks import Flag

__all__ = ["Driver"]

log = logging.getLogger("tunnel")

#: The most frames one write carries (at most 1 MiB of 16 KiB chunks, well
#: inside grpclib's 4 MiB HTTP/2 window); the loop yields to the reader
#: between batches.
MAX_BATCH = 64
#: Bytes of message data a stream may have queued before its sender waits,
#: at least: one flow-control window (the stream's own, if the peer granted
#: more), so small messages never wait for the writer and a sender with a
#: large window can keep it full (``Driver.within_send_buffer``).
SEND_BUFFER = 65_536
#: The reader stops reading while more than this many frames that no sender
#: holds back (``Connection.backlog``) wait to leave, and goes on once they
#: are down to ``BACKLOG_LOW``: a peer that sends and never reads (a flood
#: of streams to refuse, say) is slowed down to the pace at which it reads,
#: through the carrying call's own flow control, instead of making us queue
#: answers without end.
BACKLOG_HIGH = 1024
BACKLOG_LOW = 256

InFrame = TypeVar("InFrame", bound=Message)
OutFrame = TypeVar("OutFrame", bound=Message)


class Driver(Generic[InFrame, OutFrame]):
    """Reader and writer tasks around one protocol core."""

    def __init__(
        self,
        core: Connection[OutFrame],
        receive: Callable[[InFrame], list[Event]],
        send: Callable[[OutFrame], Awaitable[None]],
        recv: Callable[[], Awaitable[InFrame | None]],
        send_batch: Callable[[list[OutFrame]], Awaitable[None]] | None = None,
    ) -> None:
        self.core = core
        self._receive = receive
        self._send = send
        self._send_batch = send_batch
        self._recv = recv
        self._wakeup = Flag()
        #: Streams waiting for their queued message to be written.
        self._flush_waiters: dict[int, asyncio.Future[None]] = {}
        #: Bytes the application consumed per stream, not yet given back to
        #: the core (``acknowledge``).
        self._consumed: dict[int, int] = {}
        self._writer_idle = Flag()
        self._writer_idle.set()
        #: Set by the writer once the backlog is low again, for a reader
        #: that stopped reading (see ``BACKLOG_HIGH``).
        self._backlog_low: asyncio.Event | None = None
        #: Event-loop times at which the last frame arrived (keepalive) and left.
        self.last_received = self.last_sent = asyncio.get_running_loop().time()
        #: Seconds senders have spent waiting in ``flushed`` (statistics).
        self.send_wait = 0.0

    # -- writing ---------------------------------------------------------

    def wake(self) -> None:
        """Tell the writer the core may have frames to send."""
        self._wakeup.set()

    def acknowledge(self, stream_id: int, n: int) -> None:
        """The application consumed ``n`` bytes of a stream's data.

        The window goes back to the core when the writer next runs, as one
        ``window_update`` per stream for everything consumed since its last
        batch: a bulk reader consumes a chunk at a time, and a frame per
        chunk (encoded, sent, parsed and applied by the peer) costs as much
        as a quarter of the chunk itself.  The peer accepts any split of the
        same sum (PROTOCOL.md), and nothing is held back longer than the
        writer takes to wake up, so the sender never waits on it.  The core
        still decides whether an update may go out at all (none on a stream
        that is over or half-closed by the peer).
        """
        consumed = self._consumed
        consumed[stream_id] = consumed.get(stream_id, 0) + n
        self._wakeup.set()

    def _give_back(self) -> None:
        """Hand what the application consumed to the core (``acknowledge``)."""
        consumed = self._consumed
        acknowledge = self.core.acknowledge
        for stream_id, n in consumed.items():
            acknowledge(stream_id, n)
        consumed.clear()

    def within_send_buffer(self, stream_id: int) -> bool:
        """True if a sender on this stream need not wait for the writer now.

        It may have one window of message data queued: ``SEND_BUFFER``, or
        the window the peer granted the stream (at its start or since) if
        larger.  (With a fixed 64 KiB, a sender whose peer grants 1 MiB
        waited for the writer every 64 KiB and never kept its window full.)
        """
        core = self.core
        return core.buffered_message_bytes(stream_id) <= max(
            SEND_BUFFER, core.send_window(stream_id)
        )

    async def flushed(self, stream_id: int) -> None:
        """Wait while a stream has more than its ``send_buffer`` queued.

        This is the back-pressure of a tunneled ``send_message``: small
        messages return at once and go out together in the writer's next
        batch; a sender that outruns the carrying stream or the peer's
        window waits here, holding at most one window's worth of data.
        """
        if self.within_send_buffer(stream_id):
            return
        loop = asyncio.get_running_loop()
        fut = self._flush_waiters.get(stream_id)
        if fut is None:
            fut = loop.create_future()
            self._flush_waiters[stream_id] = fut
        self.wake()
        started = loop.time()
        try:
            await asyncio.shield(fut)
        finally:
            self.send_wait += loop.time() - started

    def release_waiters(self, stream_id: int | None = None) -> None:
        """Wake senders of one stream (or all) whose data will never go out."""
        ids = list(self._flush_waiters) if stream_id is None else [stream_id]
        for sid in ids:
            fut = self._flush_waiters.pop(sid, None)
            if fut is not None and not fut.done():
                fut.set_result(None)

    async def write_loop(self) -> None:
        """Write frames as the core produces them, until cancelled.

        With a batch sender, every frame the core has ready (up to
        ``MAX_BATCH``) goes out in one write; the core's round-robin still
        decides their order.
        """
        core = self.core
        waiters = self._flush_waiters
        send = self._send
        send_batch = self._send_batch
        clock = asyncio.get_running_loop().time
        consumed = self._consumed
        while True:
            if consumed:
                self._give_back()
            frame = core.next_frame()
            if frame is None:
                self._writer_idle.set()
                self._wakeup.clear()
                await self._wakeup.wait()
                continue
            self._writer_idle.clear()
            if send_batch is None:
                await send(frame)
                batch = [frame]
            else:
                batch = [frame]
                while len(batch) < MAX_BATCH:
                    more = core.next_frame()
                    if more is None:
                        break
                    batch.append(more)
                await send_batch(batch)
            self.last_sent = clock()
            backlog_low = self._backlog_low
            if backlog_low is not None and core.backlog() <= BACKLOG_LOW:
                self._backlog_low = None
                backlog_low.set()
            if waiters:
                for sent in batch:
                    sid: int = sent.stream_id  # type: ignore[attr-defined]
                    fut = waiters.get(sid)
                    if fut is not None and self.within_send_buffer(sid):
                        del waiters[sid]
                        if not fut.done():
                            fut.set_result(None)

    async def drain(self) -> None:
        """Wait until the writer has written everything the core queued."""
        while self.core.has_frames() or self._consumed or not self._writer_idle.is_set():
            self._writer_idle.clear()
            self.wake()
            await self._writer_idle.wait()

    # -- reading ---------------------------------------------------------

    async def read_loop(
        self,
        on_events: Callable[[list[Event]], None],
        on_fatal: Callable[[Exception], None] | None = None,
    ) -> None:
        """Feed frames to the core until the carrying stream ends.

        ``RemoteProtocolError`` from the core propagates: the tunnel is over.
        ``on_fatal`` hears of it first, in the same step, before any other
        task runs: the core is failed from then on, and nothing may call it
        as if it were not.
        """
        receive = self._receive
        core = self.core
        clock = asyncio.get_running_loop().time
        while True:
            frame = await self._recv()
            if frame is None:
                return
            self.last_received = clock()
            try:
                events = receive(frame)
            except Exception as exc:
                if on_fatal is not None:
                    on_fatal(exc)
                raise
            if events:
                on_events(events)
            if core.has_frames():
                self._wakeup.set()
                if core.backlog() > BACKLOG_HIGH:
                    backlog_low = self._backlog_low = asyncio.Event()
                    await backlog_low.wait()
