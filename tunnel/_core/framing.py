"""The carrying call's messages: the gRPC prefix, the frame bound, decoding.

Each tunnel frame travels as one gRPC message of the carrying call: a
5-byte prefix (a compressed flag, then the length as four big-endian bytes)
and the serialized frame.  A receiver reads the prefix, decides, and only
then reads the body, so a frame over the bound is refused before any of it
is buffered (see ``tunnel/_carrier.py`` for the reading itself).  No
compression is ever negotiated on the carrying call (the tunnel's frames
are small and mostly incompressible chunks), so the flag must be zero.
"""

from __future__ import annotations

from typing import TypeVar

from google.protobuf.message import DecodeError, Message

from ..errors import FrameTooLarge, RemoteProtocolError

__all__ = ["PREFIX_SIZE", "decode_frame", "frame_length", "frame_prefix"]

F = TypeVar("F", bound=Message)

#: The gRPC message prefix: a compressed flag and a 4-byte big-endian length.
PREFIX_SIZE = 5


def frame_prefix(length: int) -> bytes:
    """The gRPC prefix of an uncompressed message of ``length`` bytes."""
    return b"\x00" + length.to_bytes(4, "big")


#: Bytes as they are read off the carrying call: whole, or a view into a buffer.
Data = bytes | bytearray | memoryview


def frame_length(prefix: Data, limit: int) -> int:
    """The length of the frame a prefix announces, if this end takes it.

    Raises ``FrameTooLarge`` for a length over ``limit`` and
    ``RemoteProtocolError`` for a compressed frame: either ends the tunnel.
    """
    if prefix[0]:
        raise RemoteProtocolError(
            "compressed frame on the carrying call, which negotiated no compression"
        )
    length = int.from_bytes(prefix[1:PREFIX_SIZE], "big")
    if length > limit:
        raise FrameTooLarge(length, limit)
    return length


def decode_frame(frame_type: type[F], data: Data) -> F:
    """Parse one frame; bytes that are not one (bad protobuf, a string field
    that is not UTF-8) are a ``RemoteProtocolError``."""
    try:
        return frame_type.FromString(data)  # type: ignore[arg-type]  # upb takes any buffer
    except DecodeError as exc:
        raise RemoteProtocolError(f"undecodable frame ({exc})") from None
