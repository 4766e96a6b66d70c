"""The sans-IO grpctunnel.v1 protocol core.

Nothing in this package does I/O, imports asyncio or touches a grpclib stream.
A protocol object takes the peer's frames in (``receive_frame``), returns
events that say what happened, and buffers the frames it wants sent
(``next_frame``).  The grpclib adapter on top moves frames between these
objects and the carrying gRPC stream and turns events into the behaviour of
grpclib channels and handlers.  Keeping the rules here means every rule of
the protocol can be tested synchronously, frame by frame.

The modules, each with one job:

* ``states``: the states of a stream's two halves and the one table of what
  every input does in each (docs/stream-states.md is its rendering,
  written by ``render``);
* ``connection``: what both ends share: the stream table, fair scheduling
  of outgoing frames, windows given back, the tunnel's failure;
* ``client`` / ``server``: each end's calls and the frames it receives;
* ``flow``: a stream's send queue and send window, the checks of arriving
  message bytes;
* ``framing``, ``metadata``, ``events``: the carrying call's messages,
  metadata conversion, and the events ``receive_frame`` returns.
"""

from .client import TunnelClientProtocol
from .server import TunnelServerProtocol

__all__ = ["TunnelClientProtocol", "TunnelServerProtocol"]
