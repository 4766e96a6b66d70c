"""``TunnelStatistics``: what one tunnel has carried, read at one moment.

A snapshot, not a live view: take a new one to see change.  The counters come
from the tunnel's protocol object (which counts what crosses it, keepalive
probes left out), the times from its asyncio driver.  Any library user can
read them; the router's metrics are built on them.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["TunnelStatistics"]


@dataclass(frozen=True, slots=True)
class TunnelStatistics:
    """One tunnel's counters and times (see the module docstring)."""

    #: Streams started in the tunnel (by the tunnel client; on the tunnel
    #: server's side, refused ones included).
    streams_opened: int
    #: Streams open now.
    streams_active: int
    #: Streams that ended with a status other than OK (cancels and refusals
    #: included).
    streams_failed: int
    #: Whole messages sent and received, and bytes of message data.
    messages_sent: int
    messages_received: int
    bytes_sent: int
    bytes_received: int
    #: Seconds senders spent waiting for their data to leave: for the peer's
    #: flow-control window to open, or for the carrying call to take it.
    send_wait_seconds: float
    #: Seconds since the tunnel opened.
    age_seconds: float
    #: Seconds since the last frame was sent or received.
    idle_seconds: float
    #: Round-trip time of the last keepalive check; None until there was one.
    keepalive_rtt_seconds: float | None
