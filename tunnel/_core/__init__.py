"""The sans-IO grpctunnel.v1 protocol core.

Nothing in this package does I/O, imports asyncio or touches a grpclib stream.
A protocol object takes the peer's frames in (``receive_frame``), returns
events that say what happened, and buffers the frames it wants sent
(``next_frame``).  The grpclib adapter on top moves frames between these
objects and the carrying gRPC stream and turns events into the behaviour of
grpclib channels and handlers.  Keeping the rules here means every rule of
the protocol can be tested synchronously, frame by frame.
"""

from .client import TunnelClientProtocol
from .server import TunnelServerProtocol

__all__ = ["TunnelClientProtocol", "TunnelServerProtocol"]
