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

import importlib
import importlib.util
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._reconnecting import ReconnectingTunnelChannel
    from ._server_tunnel import TunnelInfo, current_tunnel
    from ._stats import TunnelStatistics
    from ._tunnel import EndReason
    from .channel import TunnelChannel, open_tunnel
    from .device import ReverseTunnelServer
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
    from .reverse import ReverseChannel


#: Where each public name lives.  Imported on first use (PEP 562), so that
#: ``import tunnel._core`` (a driver for another event loop, say) and the
#: programs' ``--help`` do not pay for the asyncio layer and grpclib's I/O.
_WHERE = {
    "EndReason": "._tunnel",
    "Fallback": ".fallback",
    "FrameTooLarge": ".errors",
    "KeepaliveTimeoutError": ".errors",
    "LocalProtocolError": ".errors",
    "MetadataError": ".errors",
    "NegotiationError": ".errors",
    "OpenTimeoutError": ".errors",
    "Proxy": ".proxy",
    "RawMessage": ".raw",
    "RawStatusDetails": ".raw",
    "RawStatusDetailsCodec": ".raw",
    "ReconnectingTunnelChannel": "._reconnecting",
    "RemoteProtocolError": ".errors",
    "ReverseChannel": ".reverse",
    "ReverseTunnelServer": ".device",
    "TunnelChannel": ".channel",
    "TunnelClosedError": ".errors",
    "TunnelError": ".errors",
    "TunnelInfo": "._server_tunnel",
    "TunnelOptions": ".options",
    "TunnelServiceHandler": ".handler",
    "TunnelStatistics": "._stats",
    "current_tunnel": "._server_tunnel",
    "install_fallback": ".fallback",
    "open_tunnel": ".channel",
}


def __getattr__(name: str) -> Any:
    where = _WHERE.get(name)
    if where is not None:
        value = getattr(importlib.import_module(where, __name__), name)
    elif importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule, as `tunnel.proxy`
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})


# The one place the version is written: pyproject.toml reads it from here
# (statically), and the installed distribution's metadata carries it.
__version__ = "0.1.0.dev0"

__all__ = [
    "EndReason",
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
