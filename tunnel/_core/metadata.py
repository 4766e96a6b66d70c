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
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from .._pb.tunnel_pb2 import Metadata
from ..errors import MetadataError

__all__ = [
    "MetadataError",
    "MetadataPairs",
    "decode_metadata",
    "encode_metadata",
    "is_reserved",
]

MetadataPairs = tuple[tuple[str, "str | bytes"], ...]

_RESERVED_KEYS = frozenset({"content-type", "user-agent", "te", "host"})
_VALID_KEY = re.compile(r"^[0-9a-z_.\-]+$")


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
    ``MetadataError`` for a key that is not valid gRPC metadata or for
    metadata larger than ``limit`` bytes.
    """
    pairs: list[tuple[str, str | bytes]] = []
    size = 0
    for key, values in frame.md.items():
        if is_reserved(key):
            continue
        if not _VALID_KEY.match(key):
            raise MetadataError(f"invalid metadata key {key!r}")
        binary = key.endswith("-bin")
        for text in values.val:
            size += len(key) + len(text)
            if size > limit:
                raise MetadataError(f"metadata exceeds the limit of {limit} bytes")
            pairs.append((key, text.encode("utf-8") if binary else text))
    return tuple(pairs)
