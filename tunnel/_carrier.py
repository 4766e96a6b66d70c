"""The carrying gRPC stream, as the tunnel's driver sees it.

A tunnel needs four things of the call that carries it: send a frame,
receive a frame, and (for the ends that can) close its side and collect the
final status.  ``StreamCarrier`` provides the first two over any grpclib
stream, client or server side, plain or tunneled; the forward and reverse
modules add the rest where it applies.

Writing several tunnel frames in one go:

A tunneled unary call takes at least six frames.  Sent one by one through
grpclib's ``send_message``, each frame becomes its own HTTP/2 DATA frame and
its own socket write, and that per-write cost, not the frames' encoding,
dominates a small call.  When the carrying call is a genuine grpclib stream,
the frames the core has ready are instead framed as gRPC messages (the
5-byte length prefix of the gRPC wire format) and handed to the HTTP/2
stream as one block of data; the receiver cannot tell the difference, since
a DATA frame may hold any number of whole or partial gRPC messages.

This reaches into grpclib's private ``Stream._stream`` (the HTTP/2 stream
and its ``send_data``), present in every grpclib release this package
accepts (``<0.5``).  Where it is missing, as when a tunnel runs inside
another tunnel, frames are sent one by one with the public API.  grpclib's
``SendMessage`` events do not fire for batched frames of the carrying call.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message
from grpclib.protocol import Peer

from ._seam import abort_connection, connection_is_lost

__all__ = ["BatchSender", "StreamCarrier", "batch_sender"]

BatchSender = Callable[[Sequence[Message]], Awaitable[None]]


def batch_sender(grpclib_stream: Any) -> BatchSender | None:
    """A function writing many frames at once on this stream, if possible."""
    h2_stream = getattr(grpclib_stream, "_stream", None)
    send_data = getattr(h2_stream, "send_data", None)
    if send_data is None or not callable(send_data):
        return None

    async def send_batch(frames: Sequence[Message]) -> None:
        parts: list[bytes] = []
        for frame in frames:
            data = frame.SerializeToString()
            parts.append(b"\x00" + len(data).to_bytes(4, "big"))
            parts.append(data)
        await send_data(b"".join(parts))

    return send_batch


SendFrame = TypeVar("SendFrame", bound=Message)
RecvFrame = TypeVar("RecvFrame", bound=Message)


class StreamCarrier(Generic[SendFrame, RecvFrame]):
    """Frames over a grpclib stream (client or server side) that is open.

    A client stream must have sent its request, so that ``peer`` and the
    HTTP/2 stream behind it exist.  This base serves a call from the side
    that cannot half-close it (a network server, which ends a call by
    returning from its handler): ``end``, ``finish`` and ``aclose`` do
    nothing; the forward and reverse modules add them where they apply.
    """

    can_half_close = False

    def __init__(self, stream: Any) -> None:
        self._stream = stream
        self.peer: Peer | None = getattr(stream, "peer", None)
        self.send_batch = batch_sender(stream)

    async def send(self, frame: SendFrame) -> None:
        await self._stream.send_message(frame)

    async def recv(self) -> RecvFrame | None:
        frame: RecvFrame | None = await self._stream.recv_message()
        return frame

    async def end(self) -> None:
        pass

    async def finish(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def abort_connection(self) -> None:
        abort_connection(self._stream)

    def connection_lost(self) -> bool:
        return connection_is_lost(self._stream)
