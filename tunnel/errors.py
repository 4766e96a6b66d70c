"""Exceptions: who is at fault, and how far the damage goes.

Two questions decide how a failure is reported, and the exception classes
answer them (the split follows h11's local/remote errors):

* Whose fault is it?  ``LocalProtocolError`` means *you* misused the API (sent
  on a finished stream, opened a stream before the tunnel was ready, ...).
  ``RemoteProtocolError`` means the *peer* broke the grpctunnel.v1 protocol.
* How far does it reach?  A fault confined to one tunneled stream never raises
  out of the protocol core: that stream is ended with a gRPC status and the
  tunnel lives on.  Only faults that make the whole tunnel untrustworthy (a
  stream id reused, a frame for a stream that was never opened, failed
  negotiation) surface as ``RemoteProtocolError`` and end the tunnel.

Calls made through a tunnel keep grpclib's conventions: a failed call raises
``grpclib.exceptions.GRPCError`` with a status, whatever the cause.
"""

from __future__ import annotations

__all__ = [
    "KeepaliveTimeoutError",
    "LocalProtocolError",
    "NegotiationError",
    "OpenTimeoutError",
    "RemoteProtocolError",
    "TunnelClosedError",
    "TunnelError",
]


class TunnelError(Exception):
    """Base class of every exception raised by this library."""


class LocalProtocolError(TunnelError):
    """The API was used in a way the protocol does not allow."""


class RemoteProtocolError(TunnelError):
    """The peer broke the protocol badly enough that the tunnel must end."""


class NegotiationError(RemoteProtocolError):
    """The two ends could not agree on a protocol revision, or the peer's
    first frame was not the ``Settings`` frame it promised."""


class TunnelClosedError(TunnelError):
    """The tunnel is closed (or closing) and cannot carry new streams."""


class OpenTimeoutError(NegotiationError, TimeoutError):
    """Opening a tunnel took longer than ``TunnelOptions.negotiation_timeout``.

    The message says which step did not finish in time: the connection, the
    carrying call's response headers, or the tunnel server's ``Settings``.
    It is also a ``TimeoutError``, grpclib's convention for a local deadline.
    """


class KeepaliveTimeoutError(TunnelError):
    """The peer did not answer a keepalive check in time and is taken for dead."""
