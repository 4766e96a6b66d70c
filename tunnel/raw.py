"""Messages and status details as bytes, for code that forwards calls it does not know.

A proxy forwards methods it has no ``.proto`` for, so it can neither decode
their messages nor the detail types in their error statuses.  It does not
need to: it only has to carry the bytes from one call to another.

grpclib's ``ProtoCodec`` asks of a message type only ``FromString(data)``
and, of a message, ``SerializeToString()`` plus an ``isinstance`` check
against the declared type.  ``RawMessage`` provides exactly that, so raw
bytes travel through any grpclib server or channel (a tunnel's included)
next to handlers that use real protobuf classes on the same server: the
codec stays the server's own.

Status details are the same problem one level down.  ``grpc-status-details-bin``
(in a tunnel: ``CloseStream.status``) is a serialized ``google.rpc.Status``
whose ``details`` are ``Any`` messages of arbitrary types.  grpclib's
``ProtoStatusDetailsCodec`` decodes them through the protobuf symbol
database (an unknown type becomes an opaque ``Unknown(name)``, its bytes
lost) and re-encodes with ``Any.Pack``, which needs the real classes.
``RawStatusDetailsCodec`` instead hands the whole serialized status over as
``RawStatusDetails`` and writes it back byte for byte.
"""

from __future__ import annotations

from typing import Any

from grpclib.const import Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.encoding.proto import ProtoStatusDetailsCodec

__all__ = ["RawMessage", "RawStatusDetails", "RawStatusDetailsCodec"]


class _Bytes:
    """Bytes that stand for something this process does not decode."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        #: Exactly the bytes that were (or will be) on the wire.
        self.data = data

    def __eq__(self, other: object) -> bool:
        if type(other) is type(self):
            return self.data == other.data
        return NotImplemented

    def __hash__(self) -> int:
        return hash(self.data)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({len(self.data)} bytes)"


class RawMessage(_Bytes):
    """One gRPC message as its serialized bytes, for grpclib's ``ProtoCodec``.

    Use it as the request and reply type of a call whose messages you only
    pass along: ``channel.request(name, cardinality, RawMessage, RawMessage)``.
    """

    __slots__ = ()

    def __init__(self, data: bytes = b"") -> None:
        super().__init__(data)

    @classmethod
    def FromString(cls, data: bytes) -> RawMessage:  # protobuf's names, as ProtoCodec calls them
        return cls(data)

    def SerializeToString(self, deterministic: bool | None = None) -> bytes:
        del deterministic  # the bytes are what they are
        return self.data


class RawStatusDetails(_Bytes):
    """A call's error details as received: a serialized ``google.rpc.Status``.

    It is what ``GRPCError.details`` holds when the call was read with a
    ``RawStatusDetailsCodec``, and what such a codec writes back unchanged.
    """

    __slots__ = ()


class RawStatusDetailsCodec(StatusDetailsCodecBase):
    """Status details in and out as ``RawStatusDetails``, bytes unchanged.

    Decoding never looks at the detail types.  Encoding writes a
    ``RawStatusDetails`` back as it was; any other details (a list of
    protobuf messages, as for ``ProtoStatusDetailsCodec``) go to ``inner``,
    so handlers that raise ordinary ``GRPCError(..., details=[...])`` keep
    working where this codec is used.
    """

    def __init__(self, inner: StatusDetailsCodecBase | None = None) -> None:
        self._inner = inner if inner is not None else ProtoStatusDetailsCodec()

    def encode(self, status: Status, message: str | None, details: Any) -> bytes:
        if isinstance(details, RawStatusDetails):
            return details.data
        return self._inner.encode(status, message, details)

    def decode(self, status: Status, message: str | None, data: bytes) -> Any:
        return RawStatusDetails(data)
