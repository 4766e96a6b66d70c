"""The carrying gRPC stream, as the tunnel's driver sees it.

A tunnel needs four things of the call that carries it: send a frame,
receive a frame, and (for the ends that can) close its side and collect the
final status.  ``StreamCarrier`` provides the first two over any grpclib
stream, client or server side, plain or tunneled; the forward and reverse
modules add the rest where it applies.

Every frame is bounded before it is buffered:

The tunnel's frames are small (a chunk of at most 16 KiB of message data,
or metadata within ``max_metadata_size``), but the carrying call is a
gRPC call like any other, and grpclib's ``recv_message`` reads whatever
length a message's 5-byte prefix announces, then parses it: one hostile
frame of 200 MiB would cost 200 MiB (twice, while it is parsed).  So when
the carrying call is a genuine grpclib stream, frames are read here off its
HTTP/2 stream: the prefix first, then the body only if the announced length
is within ``max_frame_size``.  A longer frame ends the tunnel with
``FrameTooLarge`` (RESOURCE_EXHAUSTED) with at most ``READ_LIMIT`` bytes
of it read; the bytes received beyond those stay unacknowledged in
grpclib's buffer, so the peer can never have more than the HTTP/2 stream
window in flight.

Reading many frames at once:

Frames are read off the HTTP/2 stream as they arrived, a DATA frame's worth
(at most ``READ_LIMIT`` bytes) at a time, and every whole frame in it is
parsed at once; ``recv`` then hands them out one by one without touching
the stream again.  What is held beyond the frames parsed is the start of
the next frame, whose prefix was checked against the bound before any more
was read.  So each end of the carrying connection also lets its peer send
HTTP/2 DATA frames of up to ``DATA_FRAME_SIZE`` bytes
(``_seam.receive_large_frames``): a batch of chunks then crosses in a few
DATA frames instead of one per 16 KiB, and grpclib and h2 work per DATA
frame, not per byte.

What grpclib's ``recv_message`` does and this keeps: the compressed-flag
byte is honoured (no compression is ever negotiated on the carrying call,
so a set flag is a protocol error, where grpclib raises
``NotImplementedError``), data is acknowledged to the HTTP/2 peer as it is
read, and a read on the client side runs inside the call's wrapper so a
lost connection ends it.  What it does not: grpclib's ``RecvMessage`` event
does not fire for the carrying call's frames, and its message counters do
not count them.  A frame that does not parse (bad protobuf, invalid UTF-8
in a string field) is a ``RemoteProtocolError`` like any other violation.

A tunnel nested in another tunnel has no HTTP/2 stream to read from: its
carrying call is itself tunneled, and the outer tunnel has reassembled each
frame, bounded by the outer tunnel's ``max_receive_message_length``, before
this end sees it.  There the frame bound is applied after reassembly.

Writing several tunnel frames in one go:

A tunneled unary call takes at least six frames.  Sent one by one through
grpclib's ``send_message``, each frame becomes its own HTTP/2 DATA frame and
its own socket write, and that per-write cost, not the frames' encoding,
dominates a small call.  When the carrying call is a genuine grpclib stream,
the frames the core has ready are instead framed as gRPC messages (the
5-byte length prefix of the gRPC wire format) and handed to the HTTP/2
stream as one block of data; the receiver cannot tell the difference, since
a DATA frame may hold any number of whole or partial gRPC messages.
grpclib's ``SendMessage`` events do not fire for batched frames of the
carrying call.  Where there is no HTTP/2 stream (nested tunnels), frames
are sent one by one with the public API.

Every touch of grpclib's internals used here is in ``_seam``.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from google.protobuf.message import DecodeError, Message
from grpclib.protocol import Peer

from . import _seam
from ._core.framing import PREFIX_SIZE, decode_frame, frame_length, frame_prefix
from .errors import FrameTooLarge, RemoteProtocolError

__all__ = ["DATA_FRAME_SIZE", "READ_LIMIT", "BatchSender", "StreamCarrier", "batch_sender"]

#: The longest HTTP/2 DATA frame each end of a carrying connection takes
#: (``_seam.receive_large_frames``): eight chunks, so a batch of frames
#: crosses in a few DATA frames.
DATA_FRAME_SIZE = 128 * 1024
#: The most bytes of the carrying stream read in one go.
READ_LIMIT = 256 * 1024

_CUT = "the carrying call ended in the middle of a frame"

BatchSender = Callable[[Sequence[Message]], Awaitable[None]]


def batch_sender(grpclib_stream: Any) -> BatchSender | None:
    """A function writing many frames at once on this stream, if possible."""
    h2 = _seam.http2_stream(grpclib_stream)
    if h2 is None:
        return None

    async def send_batch(frames: Sequence[Message]) -> None:
        parts: list[bytes] = []
        for frame in frames:
            data = frame.SerializeToString()
            parts.append(frame_prefix(len(data)))
            parts.append(data)
        await _seam.send_data(h2, b"".join(parts))

    return send_batch


SendFrame = TypeVar("SendFrame", bound=Message)
RecvFrame = TypeVar("RecvFrame", bound=Message)


class StreamCarrier(Generic[SendFrame, RecvFrame]):
    """Frames over a grpclib stream (client or server side) that is open.

    ``recv_type`` is the class of the frames the peer sends;
    ``max_frame_size`` bounds each of them (see the module docstring).  A
    client stream must have sent its request and received the response
    headers, so that ``peer`` and the HTTP/2 stream behind it exist.  This
    base serves a call from the side that cannot half-close it (a network
    server, which ends a call by returning from its handler): ``end``,
    ``finish`` and ``aclose`` do nothing; the forward and reverse modules
    add them where they apply.
    """

    can_half_close = False

    def __init__(self, stream: Any, recv_type: type[RecvFrame], *, max_frame_size: int) -> None:
        self._stream = stream
        self._recv_type = recv_type
        self.max_frame_size = max_frame_size
        self.peer: Peer | None = getattr(stream, "peer", None)
        self._h2 = _seam.http2_stream(stream)
        self._wrapper = _seam.call_wrapper(stream)
        self.send_batch = batch_sender(stream)
        #: Frames read and parsed, not yet handed out by ``recv``, last first
        #: (a list: an empty deque costs 760 bytes, kept by every idle tunnel).
        self._frames: list[RecvFrame] = []
        #: Bytes read of a frame not yet whole (its prefix checked).
        self._partial = bytearray()
        #: What the frames read so far broke, raised after the frames before it.
        self._broken: RemoteProtocolError | None = None
        if self._h2 is not None:
            _seam.receive_large_frames(self._h2, DATA_FRAME_SIZE)
            _seam.skip_data_frame_dumps(self._h2)
            _seam.light_stream_events(self._h2)

    async def send(self, frame: SendFrame) -> None:
        await self._stream.send_message(frame)

    async def recv(self) -> RecvFrame | None:
        """The next frame, or None once the peer ended its side.

        Raises ``RemoteProtocolError`` (``FrameTooLarge`` for a frame over
        the bound) if the frame cannot be taken: that ends the tunnel.
        """
        frames = self._frames
        if frames:
            return frames.pop()
        h2 = self._h2
        if h2 is None:
            return await self._recv_reassembled()
        while not frames:
            if self._broken is not None:
                raise self._broken
            try:
                with self._wrapper:
                    parts = await _seam.recv_some(h2, READ_LIMIT)
            except _seam.DataTruncated:
                raise RemoteProtocolError(_CUT) from None
            if not parts:
                if self._partial:
                    raise RemoteProtocolError(_CUT)
                return None
            self._parse(parts)
        return frames.pop()

    def _parse(self, parts: list[bytes]) -> None:
        """Parse every whole frame of what was read (after what was held).

        Called with no parsed frame left.
        """
        partial = self._partial
        for part in parts:
            partial += part
        frames = self._frames
        limit = self.max_frame_size
        recv_type = self._recv_type
        end = len(partial)
        start = 0
        view = memoryview(partial)
        try:
            while end - start >= PREFIX_SIZE:
                body = start + PREFIX_SIZE
                stop = body + frame_length(view[start:body], limit)
                if stop > end:
                    break
                frames.append(decode_frame(recv_type, view[body:stop]))
                start = stop
        except RemoteProtocolError as error:
            # Nothing more is parsed.  The buffer is dropped, not trimmed:
            # views of it live on in the error's traceback.
            self._broken = error
            self._partial = bytearray()
        else:
            view.release()
            del partial[:start]
        frames.reverse()  # ``recv`` pops from the end

    async def _recv_reassembled(self) -> RecvFrame | None:
        # A tunneled carrying call: the outer tunnel bounded the reassembly.
        try:
            frame: RecvFrame | None = await self._stream.recv_message()
        except DecodeError as exc:
            raise RemoteProtocolError(f"undecodable frame ({exc})") from None
        if frame is not None and (size := frame.ByteSize()) > self.max_frame_size:
            raise FrameTooLarge(size, self.max_frame_size)
        return frame

    async def end(self) -> None:
        pass

    async def finish(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def abort_connection(self) -> None:
        _seam.abort_connection(self._stream)

    def connection_lost(self) -> bool:
        return _seam.connection_is_lost(self._stream)
