"""Exceptions: what a user catches, who is at fault, how far the damage goes.

What you catch.  A tunneled call keeps grpclib's conventions, so code
written for a plain grpclib ``Channel`` handles a ``TunnelChannel`` unchanged;
where grpclib has no convention, the exception is one of this module's.
Every exception class this library defines is a ``TunnelError``; the
exceptions it passes on from grpclib, asyncio and the operating system are
not (they are the same ones a plain grpclib call raises).

==========================================  ==============================================
What went wrong                              What is raised
==========================================  ==============================================
A call ends with a non-OK status: its        ``grpclib.exceptions.GRPCError`` with that
handler's, or the tunnel's (the tunnel       status, message and details (as over
went away: UNAVAILABLE; the caller's own     grpclib directly)
``close()``: CANCELLED)
A call's local deadline passes               ``asyncio.TimeoutError`` (grpclib's)
A call's stream API is misused (a second     ``grpclib.exceptions.ProtocolError``
message on a unary call, ``end()`` twice)    (grpclib's)
Metadata that grpclib refuses (a bad key,    ``ValueError`` / ``TypeError``, as grpclib's
a value of the wrong type)                   ``encode_metadata`` raises them
Metadata that grpclib takes but the tunnel   ``MetadataError``: a ``TunnelError`` and a
cannot carry (binary values that are not     ``ValueError``; raised where it is sent (the
UTF-8, more than ``max_metadata_size``)      call's first send, or the handler's
                                             ``send_initial/trailing_metadata``); only that
                                             call fails
Opening a tunnel (``open_tunnel``,
``ReverseTunnelServer.serve``):
- the server refuses it                      ``GRPCError`` with the server's status
- no connection can be made                  the ``OSError`` grpclib raises
                                             (``ConnectionRefusedError``, ...), unchanged
- the peer breaks negotiation (a first       ``NegotiationError``
  frame that is not ``Settings``, no
  revision in common)
- the opening takes longer than              ``OpenTimeoutError``: a ``NegotiationError``
  ``TunnelOptions.negotiation_timeout``      and a ``TimeoutError``
An open tunnel ends under its calls:         on the tunnel's ``error`` attribute
                                             (``TunnelChannel.error``); each call on it
                                             fails with ``GRPCError(UNAVAILABLE)`` naming
                                             the cause
- the peer breaks the protocol badly         ``RemoteProtocolError``
  enough that the tunnel must end (a frame
  for a stream never opened, a stream id
  reused)
- the peer sends a frame larger than         ``FrameTooLarge``, a ``RemoteProtocolError``
  ``TunnelOptions.max_frame_size``           (refused from its 5-byte prefix, unread)
- the peer stops answering keepalive         ``KeepaliveTimeoutError``
  checks
- the connection is lost, or the carrying    ``TunnelClosedError`` naming the cause (its
  call fails under the tunnel                ``__cause__`` is what grpclib or the OS
                                             raised), in either role
- the peer ends the carrying call with a     that ``GRPCError``
  status (a network server shutting down)
``ReverseTunnelServer.serve()`` whose        the carrying call's ``GRPCError``:
tunnel failed after it opened                UNAVAILABLE naming the cause, INTERNAL
                                             "tunnel protocol error: ..." for a peer
                                             that broke the protocol
                                             (RESOURCE_EXHAUSTED for a frame over
                                             ``max_frame_size``)
==========================================  ==============================================

``tests/integration/test_errors_table.py`` checks the rows against real
grpclib servers on loopback (its docstring says where the others are).

Who is at fault, and how far it reaches (the split follows h11's
local/remote errors); these matter inside the library, where the sans-IO
core raises them and the asyncio layer turns them into the rows above:

* ``LocalProtocolError`` means *our* side misused the protocol (sent on a
  finished stream, opened a stream before the tunnel was ready, ...);
  ``RemoteProtocolError`` means the *peer* broke the grpctunnel.v1 protocol.
* A fault confined to one tunneled stream never raises out of the protocol
  core: that stream is ended with a gRPC status and the tunnel lives on.
  Only faults that make the whole tunnel untrustworthy (a stream id reused,
  a frame for a stream that was never opened, failed negotiation) surface as
  ``RemoteProtocolError`` and end the tunnel.
* ``TunnelClosedError``: a new stream on a tunnel that is closed or closing;
  a caller sees ``GRPCError(UNAVAILABLE)`` instead.
"""

from __future__ import annotations

import grpclib.exceptions
from grpclib.const import Status

__all__ = [
    "FrameTooLarge",
    "KeepaliveTimeoutError",
    "LocalProtocolError",
    "MetadataError",
    "NegotiationError",
    "OpenTimeoutError",
    "RemoteProtocolError",
    "TunnelClosedError",
    "TunnelError",
]


class TunnelError(Exception):
    """Base class of every exception class this library defines."""


class LocalProtocolError(TunnelError):
    """The API was used in a way the protocol does not allow."""


class RemoteProtocolError(TunnelError):
    """The peer broke the protocol badly enough that the tunnel must end."""

    #: The status the carrying call ends with, on the end that serves it.
    status: Status = Status.INTERNAL

    def grpc_error(self) -> grpclib.exceptions.GRPCError:
        """The ``GRPCError`` that ends the carrying call for this violation."""
        return grpclib.exceptions.GRPCError(self.status, f"tunnel protocol error: {self}")


class FrameTooLarge(RemoteProtocolError):
    """A frame of the carrying call is larger than ``TunnelOptions.max_frame_size``.

    The frame is refused before its body is read, and the tunnel ends with
    RESOURCE_EXHAUSTED, as a gRPC receiver ends a call whose message is over
    its limit.
    """

    status = Status.RESOURCE_EXHAUSTED

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"frame larger than max ({size} vs. {limit} bytes)")
        self.size = size
        self.limit = limit


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


class MetadataError(TunnelError, ValueError):
    """Metadata that cannot travel in a tunnel, or that arrived ill-formed or too big.

    A ``ValueError`` too, as grpclib's own refusals of metadata are, so code
    that catches those catches this.
    """
