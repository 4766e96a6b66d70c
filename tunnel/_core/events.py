"""Events returned by the protocol objects' ``receive_frame``.

Each event says what the peer did, in protocol terms.  Events are plain
immutable records, built with keyword arguments; the adapter decides what
they mean for tasks and calls.  ``stream_id`` is always the tunnel's id of
the stream (the tunnel client's numbering).
"""

from __future__ import annotations

from dataclasses import dataclass

from google.rpc.status_pb2 import Status
from grpclib.const import Cardinality

from .metadata import MetadataPairs

__all__ = [
    "DataReceived",
    "Event",
    "HalfClosed",
    "HeadersReceived",
    "Negotiated",
    "StreamEnded",
    "StreamOpened",
    "StreamReset",
]


@dataclass(frozen=True, slots=True, kw_only=True)
class Negotiated:
    """Tunnel client: the tunnel is ready for streams, at this revision."""

    #: The protocol revision both ends use: 0 (no flow control) or 1.
    revision: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamOpened:
    """Tunnel server: the peer started a stream for a method we serve."""

    stream_id: int
    #: The full method name, with its leading ``/`` (added if the peer left it out).
    method: str
    #: The request headers, validated, in grpclib's (key, value) form.
    metadata: MetadataPairs
    #: Seconds left of the caller's deadline (``grpc-timeout``), or None.
    timeout: float | None
    #: How the stream is served: the registered method's, or the fallback's.
    cardinality: Cardinality


@dataclass(frozen=True, slots=True, kw_only=True)
class HeadersReceived:
    """Tunnel client: the response headers of a stream arrived."""

    stream_id: int
    #: The response headers, validated (empty when the server sent none).
    metadata: MetadataPairs


@dataclass(frozen=True, slots=True, kw_only=True)
class DataReceived:
    """A chunk of a message arrived.

    ``end_of_message`` marks the last chunk of one message.  The receiver must
    call ``acknowledge(stream_id, len(data))`` once the application has
    consumed the chunk: that is what returns flow-control window to the peer.
    """

    stream_id: int
    #: The chunk's bytes: at most 16 KiB, a message's whole data if it is small.
    data: bytes
    #: True for the last chunk of a message (the message is whole with it).
    end_of_message: bool


@dataclass(frozen=True, slots=True, kw_only=True)
class HalfClosed:
    """Tunnel server: the client will send no more messages on this stream."""

    stream_id: int


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamEnded:
    """Tunnel client: the stream is over.

    ``status`` is None for OK.  The stream ends either because the server sent
    ``close_stream`` or because the server broke the protocol on this stream
    (then the core has already sent ``cancel`` and the status says why).
    """

    stream_id: int
    #: The final status (code, message, details); None for OK.
    status: Status | None
    #: The response trailers, validated.
    trailers: MetadataPairs
    #: True when the core ended the stream itself (the server broke the
    #: protocol on it): data received on it is no longer to be trusted.
    reset: bool = False


@dataclass(frozen=True, slots=True, kw_only=True)
class StreamReset:
    """Tunnel server: stop working on this stream.

    The client cancelled it, or broke the protocol on it.  The core has
    already sent the final ``close_stream`` with ``code`` and ``message``;
    anything the handler still sends on the stream is dropped.
    """

    stream_id: int
    #: The status code the core answered the stream with (CANCELLED for a cancel).
    code: int
    #: The message of that status.
    message: str


Event = (
    Negotiated
    | StreamOpened
    | HeadersReceived
    | DataReceived
    | HalfClosed
    | StreamEnded
    | StreamReset
)
