"""Settings of a tunnel, validated once on construction."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TypedDict

from ._core.flow import MAX_CHUNK

__all__ = ["FRAME_OVERHEAD", "TunnelOptions"]

#: Room for the parts of a frame around its data or metadata (stream id,
#: field tags and lengths), in the floor of ``max_frame_size``.
FRAME_OVERHEAD = 1024


class _ProtocolSettings(TypedDict):
    """What the sans-IO protocol objects take from the options (either end)."""

    disable_flow_control: bool
    max_receive_message_length: int
    max_metadata_size: int
    initial_window_size: int
    max_window_size: int


@dataclass(frozen=True, slots=True)
class TunnelOptions:
    """How one end of a tunnel behaves.

    The same options serve both ends; each end reads what concerns it.
    """

    #: Offer only protocol revision zero (no per-stream windows).  Both ends
    #: must allow revision one for flow control to be used.
    disable_flow_control: bool = False
    #: The largest message a tunneled stream accepts (gRPC's default, 4 MiB).
    #: A larger one fails its stream with RESOURCE_EXHAUSTED before any of it
    #: is buffered.
    max_receive_message_length: int = 4 * 1024 * 1024
    #: The largest metadata (keys plus values, in characters) one frame may
    #: carry, sent or received.  Larger metadata fails its call, not the
    #: tunnel, as long as its frame is within ``max_frame_size``.
    max_metadata_size: int = 64 * 1024
    #: The flow-control window (bytes) this end grants the peer on each
    #: stream under revision one: announced in ``Settings`` (tunnel server)
    #: and ``NewStream`` (tunnel client).  65,536 is what the reference
    #: announces; a larger window lets bulk transfers keep more data in
    #: flight, at the cost of that much more buffering per stream.
    initial_window_size: int = 65_536
    #: How large a stream's window may grow, under revision one.  A stream
    #: whose peer keeps its window nearly used up while the application
    #: reads as fast as data comes gets a larger window with its next
    #: ``window_update`` (doubling, up to this), so a bulk transfer is not
    #: held to one window per round trip; the tunnel remembers the size for
    #: its next streams.  Growth is bounded per tunnel: at most four streams
    #: at once hold a window grown this far, so buffering stays below
    #: ``max_concurrent_streams * initial_window_size`` plus four times this.
    #: Set it to ``initial_window_size`` (or less) for fixed windows, as the
    #: reference has.
    max_window_size: int = 1024 * 1024
    #: The most streams a peer may have open at once in one tunnel this end
    #: serves (the HTTP/2 default of most servers, grpclib's included).  A
    #: stream beyond it is refused at once, before any handler runs, with
    #: RESOURCE_EXHAUSTED; room frees as streams end.  This end announces it
    #: in the carrying call's headers, and a tunnel client of this library
    #: that learns a peer's limit keeps its calls within it: a call beyond
    #: it waits for room (bounded by its deadline) instead of being refused.
    max_concurrent_streams: int = 100
    #: Seconds that opening a tunnel may take, from the first byte to a
    #: tunnel ready for calls: making the connection (when the carrying
    #: channel has none yet), the carrying call's response headers and, for
    #: a tunnel client, the tunnel server's ``Settings``.  An opening that
    #: takes longer is abandoned (its carrying call reset) and fails with
    #: ``OpenTimeoutError``.
    negotiation_timeout: float = 10.0
    #: Seconds ``close()`` waits for the peer to end the carrying call after
    #: our side of it was closed, before cutting it off.
    close_timeout: float = 5.0
    #: Seconds of silence from the peer after which this end checks that the
    #: peer is still there; None turns keepalive off.  A tunnel client asks
    #: with a tunneled call that every conforming peer answers at once; a
    #: tunnel server pings the connection (see docs/keepalive.md).  Nothing
    #: is sent while the peer is talking, so busy tunnels pay nothing.
    keepalive_interval: float | None = 30.0
    #: Seconds the peer has to answer that check.  A peer that does not is
    #: taken for dead: the tunnel ends, every call on it fails with
    #: UNAVAILABLE, and the connection under it is cut so that the next
    #: attempt dials anew.  A silent peer is noticed within
    #: ``keepalive_interval + keepalive_timeout`` seconds.
    keepalive_timeout: float = 20.0
    #: The largest tunnel frame (one message of the carrying call, in bytes)
    #: this end reads.  Frames hold at most a 16 KiB chunk of data, or
    #: metadata within ``max_metadata_size``, so honest peers stay far below
    #: it.  A larger frame is refused from its 5-byte gRPC prefix, before any
    #: of it is buffered, and ends the whole tunnel with RESOURCE_EXHAUSTED
    #: (``FrameTooLarge``), as a gRPC receiver ends a call whose message is
    #: over its limit.  4 MiB is gRPC's default receive limit, which the
    #: reference's carrying call enforces too.  At least
    #: ``max_metadata_size + 16384 + FRAME_OVERHEAD``.
    max_frame_size: int = 4 * 1024 * 1024

    def __post_init__(self) -> None:
        if self.max_receive_message_length <= 0:
            raise ValueError("max_receive_message_length must be positive")
        if self.max_metadata_size <= 0:
            raise ValueError("max_metadata_size must be positive")
        floor = self.max_metadata_size + MAX_CHUNK + FRAME_OVERHEAD
        if self.max_frame_size < floor:
            raise ValueError(
                f"max_frame_size must be at least max_metadata_size + {MAX_CHUNK} + "
                f"{FRAME_OVERHEAD} ({floor}): room for a full chunk of data or for "
                "metadata at its limit"
            )
        if not 0 < self.initial_window_size <= 2**31 - 1:
            raise ValueError("initial_window_size must be between 1 and 2**31 - 1")
        if not 0 < self.max_window_size <= 2**31 - 1:
            raise ValueError("max_window_size must be between 1 and 2**31 - 1")
        if self.max_concurrent_streams < 1:
            raise ValueError("max_concurrent_streams must be at least 1")
        if not self.negotiation_timeout > 0:
            raise ValueError("negotiation_timeout must be positive")
        if not self.close_timeout > 0:
            raise ValueError("close_timeout must be positive")
        if self.keepalive_interval is not None and not self.keepalive_interval > 0:
            raise ValueError("keepalive_interval must be positive, or None to turn keepalive off")
        if not self.keepalive_timeout > 0:
            raise ValueError("keepalive_timeout must be positive")

    def _protocol_settings(self) -> _ProtocolSettings:
        """The keyword arguments of ``TunnelClientProtocol``/``TunnelServerProtocol``."""
        return _ProtocolSettings(
            disable_flow_control=self.disable_flow_control,
            max_receive_message_length=self.max_receive_message_length,
            max_metadata_size=self.max_metadata_size,
            initial_window_size=self.initial_window_size,
            max_window_size=self.max_window_size,
        )
