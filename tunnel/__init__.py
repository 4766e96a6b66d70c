"""gRPC carried over gRPC: the grpctunnel.v1 protocol on grpclib.

One gRPC stream, a *tunnel*, carries many other calls.

* A **forward** tunnel (``open_tunnel``) is opened by a network client; the
  ``TunnelChannel`` it returns is a ``grpclib.client.Channel`` whose calls all
  reach the one backend the tunnel reached, through any load balancer.
* The network server serves tunnels with a ``TunnelServiceHandler`` placed in
  its ``grpclib.server.Server``; it runs the same handler objects a Server
  takes, so tunneled calls run the application's existing service code.
* A ``Proxy`` forwards any call, unknown to it, to a channel (plain, tunnel
  or reverse pool); ``install_fallback`` puts it behind a grpclib ``Server``,
  ``fallback=`` behind a ``TunnelServiceHandler`` or ``ReverseTunnelServer``.

The wire protocol is byte-compatible with the reference implementation
(github.com/jhump/grpctunnel) and every other peer of it.
"""

from ._reconnecting import ReconnectingTunnelChannel
from ._server_tunnel import TunnelInfo, current_tunnel
from ._stats import TunnelStatistics
from .channel import TunnelChannel, open_tunnel
from .errors import (
    FrameTooLarge,
    KeepaliveTimeoutError,
    LocalProtocolError,
    MetadataError,
    NegotiationError,
    OpenTimeoutError,
    RemoteProtocolError,
    TunnelClosedError,
    TunnelError,
)
from .fallback import Fallback, install_fallback
from .handler import TunnelServiceHandler
from .options import TunnelOptions
from .proxy import Proxy
from .raw import RawMessage, RawStatusDetails, RawStatusDetailsCodec
from .reverse import ReverseChannel, ReverseTunnelServer

# The one place the version is written: pyproject.toml reads it from here
# (statically), and the installed distribution's metadata carries it.
__version__ = "0.1.0.dev0"

__all__ = [
    "Fallback",
    "FrameTooLarge",
    "KeepaliveTimeoutError",
    "LocalProtocolError",
    "MetadataError",
    "NegotiationError",
    "OpenTimeoutError",
    "Proxy",
    "RawMessage",
    "RawStatusDetails",
    "RawStatusDetailsCodec",
    "ReconnectingTunnelChannel",
    "RemoteProtocolError",
    "ReverseChannel",
    "ReverseTunnelServer",
    "TunnelChannel",
    "TunnelClosedError",
    "TunnelError",
    "TunnelInfo",
    "TunnelOptions",
    "TunnelServiceHandler",
    "TunnelStatistics",
    "current_tunnel",
    "install_fallback",
    "open_tunnel",
]
