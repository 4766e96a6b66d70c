"""The reverse tunnels a network server holds, by affinity key.

Each reverse tunnel is a ``TunnelChannel`` in two pools: the pool of every
reverse tunnel, and the pool of its affinity key.  A ``ReverseChannel``
names a pool by key and looks it up on every call, so a pool exists only
while it holds a tunnel: keys that come and go (devices by id) leave
nothing behind.  A pool hands out its usable tunnels round-robin, never one
that is closing or draining.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Hashable

from .channel import TunnelChannel

__all__ = ["ALL_TUNNELS", "Pools"]

#: The key of the pool that holds every reverse tunnel.
ALL_TUNNELS: Hashable = object()


class _Pool:
    """The open reverse tunnels of one key (or all of them), in arrival order."""

    __slots__ = ("_next", "channels")

    def __init__(self) -> None:
        self.channels: list[TunnelChannel] = []
        self._next = 0

    def pick(self) -> TunnelChannel | None:
        """The next usable tunnel, round-robin; never one that has closed."""
        channels = self.channels
        for _ in range(len(channels)):
            self._next %= len(channels)
            channel = channels[self._next]
            self._next += 1
            if channel._tunnel.usable:
                return channel
        return None

    def has_usable(self) -> bool:
        return any(channel._tunnel.usable for channel in self.channels)


class Pools:
    """Every reverse tunnel a ``TunnelServiceHandler`` holds, by affinity key."""

    def __init__(self) -> None:
        self._pools: dict[Hashable, _Pool] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def pick(self, key: Hashable) -> TunnelChannel | None:
        pool = self._pools.get(key)
        return None if pool is None else pool.pick()

    def is_ready(self, key: Hashable) -> bool:
        pool = self._pools.get(key)
        return pool is not None and pool.has_usable()

    def channels(self, key: Hashable = ALL_TUNNELS) -> list[TunnelChannel]:
        pool = self._pools.get(key)
        return [] if pool is None else list(pool.channels)

    def add(self, channel: TunnelChannel, key: Hashable) -> None:
        for pool_key in (ALL_TUNNELS, key):
            pool = self._pools.get(pool_key)
            if pool is None:
                pool = self._pools[pool_key] = _Pool()
            pool.channels.append(channel)
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def remove(self, channel: TunnelChannel, key: Hashable) -> None:
        for pool_key in (ALL_TUNNELS, key):
            pool = self._pools.get(pool_key)
            if pool is None:
                continue
            with contextlib.suppress(ValueError):
                pool.channels.remove(channel)
            if not pool.channels:
                del self._pools[pool_key]

    async def wait_ready(self, key: Hashable) -> None:
        while not self.is_ready(key):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)
