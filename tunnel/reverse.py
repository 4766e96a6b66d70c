"""Reverse tunnels at the network server: a pool of them used as one channel.

A device behind NAT (or any client that takes pushed requests) dials in and
opens ``OpenReverseTunnel``; the network server's ``TunnelServiceHandler``
keeps each such tunnel as a ``TunnelChannel`` in pools: all of them, and one
per affinity key.  ``ReverseChannel`` is a pool as a grpclib ``Channel``:
``handler.key_as_channel(key)`` and ``handler.as_channel()`` return one.
The device's side is ``tunnel.device.ReverseTunnelServer``.
"""

from __future__ import annotations

from collections.abc import Hashable
from typing import Any, TypeVar

from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ._client_tunnel import ClientTunnel
from ._network_server import AffinityKey, TunnelCallback
from ._pools import Pools
from ._seam import become_channel
from ._wire import PROTO_CODEC, PROTO_STATUS_DETAILS_CODEC
from .channel import CallingChannel, CallTarget

__all__ = ["AffinityKey", "ReverseChannel", "TunnelCallback"]

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")


class ReverseChannel(CallingChannel):
    """A pool of reverse tunnels used as one channel.

    Each call goes to the next ready tunnel, round-robin.  With no tunnel in
    the pool a call fails at once with ``GRPCError(UNAVAILABLE)``.  Client
    events listened on this channel fire for the calls sent through it.
    """

    # grpclib's Channel.__init__ is deliberately not called (no connection).
    def __init__(self, pools: Pools, key: Hashable, description: str) -> None:
        self._pools = pools
        self._key = key
        self._description = description
        self.__dispatch__ = become_channel(
            self, codec=PROTO_CODEC, status_details_codec=PROTO_STATUS_DETAILS_CODEC
        )

    def is_ready(self) -> bool:
        """True if a call made now has a tunnel to go to."""
        return self._pools.is_ready(self._key)

    async def wait_ready(self) -> None:
        """Return as soon as the pool has a usable tunnel (bound it yourself)."""
        await self._pools.wait_ready(self._key)

    def _call_target(self) -> CallTarget:
        channel = self._pools.pick(self._key)
        if channel is None:
            raise GRPCError(Status.UNAVAILABLE, f"no reverse tunnel {self._description}")
        return channel._tunnel, {"pick_another": self._pick_tunnel}

    def _pick_tunnel(self) -> ClientTunnel | None:
        """The next usable tunnel of the pool, for a call its first one refused."""
        channel = self._pools.pick(self._key)
        return None if channel is None else channel._tunnel

    async def __connect__(self) -> Any:
        raise RuntimeError("a ReverseChannel has no connection of its own")

    def close(self) -> None:
        """Nothing to close: the tunnels belong to their handler."""

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        count = len(self._pools.channels(self._key))
        return f"<ReverseChannel {self._description}: {count} tunnel(s)>"
