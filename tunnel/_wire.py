"""The carrying call on the wire: method names and headers outside the frames.

A tunnel is one gRPC call, ``OpenTunnel`` or ``OpenReverseTunnel``; these
are the names that call is made with and the headers its two ends exchange
before the first frame (PROTOCOL.md, "Negotiation").  The frames themselves
are ``_pb``'s; what they mean is ``_core``'s.
"""

from __future__ import annotations

from typing import Any

from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec

from ._seam import http2_stream_limit_reached
from .errors import OpenTimeoutError

__all__ = [
    "MAX_STREAMS_HEADER",
    "NEGOTIATE_HEADER",
    "OPEN_REVERSE_TUNNEL",
    "OPEN_TUNNEL",
    "PROTO_CODEC",
    "PROTO_STATUS_DETAILS_CODEC",
    "announced_max_streams",
    "opening_timed_out",
]

OPEN_TUNNEL = "/grpctunnel.v1.TunnelService/OpenTunnel"
OPEN_REVERSE_TUNNEL = "/grpctunnel.v1.TunnelService/OpenReverseTunnel"
#: Sent by each end that speaks revision one: the tunnel server then starts
#: with ``Settings``, and the tunnel client waits for it.
NEGOTIATE_HEADER = "grpctunnel-negotiate"
#: Sent by the tunnel server's end of the carrying call (response headers of
#: OpenTunnel, request headers of OpenReverseTunnel): how many streams it
#: serves at once.  Peers that do not know it ignore it.
MAX_STREAMS_HEADER = "grpclib-tunnel-max-streams"

#: The codecs of tunneled calls when none are given: grpclib's protobuf
#: ones keep no state, so one of each serves every tunnel and channel.
PROTO_CODEC = ProtoCodec()
PROTO_STATUS_DETAILS_CODEC = ProtoStatusDetailsCodec()


def announced_max_streams(headers: Any) -> int | None:
    """The stream limit a tunnel server announced in *headers*, if any."""
    value = headers.get(MAX_STREAMS_HEADER) if headers is not None else None
    if isinstance(value, str) and value.isdigit() and int(value) > 0:
        return int(value)
    return None


def opening_timed_out(what: str, timeout: float, step: str, channel: object) -> OpenTimeoutError:
    """The error of an opening that did not finish in time, saying where it waited.

    Waiting for "no connection" may mean the connection is at its limit of
    concurrent HTTP/2 streams (each open tunnel holds one): say so.
    """
    message = f"could not open {what} within {timeout:g} s: {step}"
    limit = http2_stream_limit_reached(channel) if step == "no connection" else None
    if limit is not None:
        message += (
            f" (the connection is at the server's limit of {limit} concurrent HTTP/2"
            f" streams, and each open tunnel holds one: use one connection per {limit}"
            " tunnels, or raise the server's limit)"
        )
    return OpenTimeoutError(message)
