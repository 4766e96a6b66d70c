"""Conversion between grpclib metadata and the tunnel's ``Metadata`` frames.

grpclib hands metadata around as pairs whose values are ``str`` for ordinary
keys and ``bytes`` for keys ending in ``-bin``.  On the tunnel, metadata is a
``map<string, Values>`` of *strings*, and the reference implementation puts a
binary value into that string field raw (not base64).  A protobuf string must
be valid UTF-8, so binary values interoperate exactly when they are valid
UTF-8; other values cannot be represented and fail the one call that carries
them (the reference fails its whole tunnel instead).

Only the application's own metadata travels: gRPC's reserved headers are
never copied into frames (``grpc-timeout`` is added by the protocol objects
themselves, on purpose).

What arrives must be metadata an HTTP/2 peer could have sent, because it
reaches handlers (and, when calls are proxied, a real HTTP/2 connection):
keys of lower-case letters, digits and ``-_.``; values of keys not ending
in ``-bin`` of printable ASCII (0x20 to 0x7E), since a frame's string could
otherwise carry a line break and smuggle a header of its own.  An empty
value is accepted: gRPC's spec grammar and grpclib's ``encode_metadata``
refuse to *send* one, but HTTP/2 allows it, grpc-go sends it, and a grpclib
handler receives it over a plain connection too.  Anything else is
``InvalidMetadata`` (naming the key), and fails the one stream that
carried it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable

from .._pb.tunnel_pb2 import Metadata
from ..errors import MetadataError

__all__ = [
    "InvalidMetadata",
    "MetadataError",
    "MetadataPairs",
    "decode_metadata",
    "encode_metadata",
    "encode_timeout_up",
    "is_reserved",
]

MetadataPairs = tuple[tuple[str, "str | bytes"], ...]

_RESERVED_KEYS = frozenset({"content-type", "user-agent", "te", "host"})
_VALID_KEY = re.compile(r"[0-9a-z_.\-]+")


class InvalidMetadata(MetadataError):
    """Metadata that arrived with a key or a value no HTTP/2 peer could send."""

    def __init__(self, message: str, key: str) -> None:
        super().__init__(message)
        self.key = key


def is_reserved(key: str) -> bool:
    """True for headers that belong to the carrying gRPC layer, not the app."""
    return key.startswith((":", "grpc-")) or key in _RESERVED_KEYS


def encode_metadata(
    pairs: Iterable[tuple[str, str | bytes]],
    into: Metadata,
    *,
    limit: int,
) -> None:
    """Write the application's metadata into a ``Metadata`` frame.

    Raises ``MetadataError`` for a binary value that is not valid UTF-8 or
    for metadata larger than ``limit`` bytes (keys plus values); the caller
    fails only the call that carried it.
    """
    size = 0
    md = into.md
    for key, value in pairs:
        if is_reserved(key):
            continue
        if isinstance(value, bytes):
            try:
                text = value.decode("utf-8")
            except UnicodeDecodeError:
                raise MetadataError(
                    f"binary metadata {key!r} is not valid UTF-8; grpctunnel.v1 "
                    "carries binary values as protobuf strings, so only "
                    "UTF-8 byte sequences can travel"
                ) from None
        else:
            text = value
        size += len(key) + len(text)
        if size > limit:
            raise MetadataError(f"metadata exceeds the limit of {limit} bytes")
        md[key].val.append(text)


def decode_metadata(frame: Metadata, *, limit: int) -> MetadataPairs:
    """Read the application's metadata out of a ``Metadata`` frame.

    Reserved headers are dropped; ``-bin`` values become ``bytes``.  Raises
    ``InvalidMetadata`` for a key or value that is not valid gRPC metadata
    (see the module docstring) and ``MetadataError`` for metadata larger
    than ``limit`` bytes.
    """
    pairs: list[tuple[str, str | bytes]] = []
    size = 0
    for key, values in frame.md.items():
        if is_reserved(key):
            continue
        if not _VALID_KEY.fullmatch(key):
            raise InvalidMetadata(f"invalid metadata key {key!r}", key)
        binary = key.endswith("-bin")
        for text in values.val:
            size += len(key) + len(text)
            if size > limit:
                raise MetadataError(f"metadata exceeds the limit of {limit} bytes")
            if binary:
                pairs.append((key, text.encode("utf-8")))
            elif text.isascii() and text.isprintable():
                pairs.append((key, text))
            else:
                raise InvalidMetadata(
                    f"invalid value of metadata key {key!r}: not printable ASCII", key
                )
    return tuple(pairs)


def encode_timeout_up(seconds: float) -> str:
    """``seconds`` as a ``grpc-timeout`` value, rounded *up* to its unit.

    grpclib's ``encode_timeout`` truncates, so the server's deadline can fall
    a little before the caller's and the server's DEADLINE_EXCEEDED race the
    caller's own timeout.  Rounded up (and sent later still), the server's
    deadline never comes first: a caller sees its own deadline pass, as
    ``asyncio.TimeoutError``, every time.  The units are gRPC's, as grpclib
    picks them (at most 8 digits each).
    """
    seconds = max(seconds, 0.0)
    if seconds > 10:
        return f"{min(math.ceil(seconds), 99_999_999)}S"
    if seconds > 0.01:
        return f"{math.ceil(seconds * 1e3)}m"
    if seconds > 0.00001:
        return f"{math.ceil(seconds * 1e6)}u"
    return f"{math.ceil(seconds * 1e9)}n"
