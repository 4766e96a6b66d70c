"""When to try a tunnel again, and when to give up: one policy for both ends.

``ReverseTunnelServer.serve_forever`` (a device) and
``ReconnectingTunnelChannel`` (a forward channel that heals) both keep one
tunnel open across drops, and decide the same two things the same way:

* How long to wait before the next attempt.  Exponential backoff from
  ``min_backoff`` to ``max_backoff`` seconds, each delay randomised by
  +/- ``jitter`` (a fraction) so that many clients do not reconnect in
  step.  A tunnel that stayed up for ``stable_after`` seconds proves the
  other end healthy, so the backoff starts over after it: a device whose
  router restarted a few times in a row is not left waiting the maximum
  once the router is back for good.
* Whether to try at all.  Some refusals will not go away by themselves: a
  server that has no tunnels enabled (UNIMPLEMENTED), a bad or expired
  credential (UNAUTHENTICATED), a key the credential may not take
  (PERMISSION_DENIED).  After ``permanent_attempts`` such refusals in a
  row the refusal is raised instead of retried forever.  Which statuses
  count is configurable.

The metadata of each attempt may come from a callable (plain or async),
called anew for every attempt, so a short-lived token can be refreshed.
"""

from __future__ import annotations

import inspect
import random
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeAlias

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from multidict import MultiDict

from ._seam import MetadataLike

__all__ = ["PERMANENT_STATUSES", "MetadataSource", "Retry", "check_callback", "resolve_metadata"]

#: Refusals that are retried at most ``permanent_attempts`` times by default.
PERMANENT_STATUSES: frozenset[Status] = frozenset(
    {Status.UNIMPLEMENTED, Status.UNAUTHENTICATED, Status.PERMISSION_DENIED}
)

#: Metadata, or a callable (plain or async) that returns it for each attempt.
MetadataSource: TypeAlias = (
    MetadataLike | Callable[[], MetadataLike | Awaitable[MetadataLike]] | None
)


def check_callback(callback: object, name: str) -> None:
    """Refuse a callback that cannot be called, where it is given."""
    if callback is not None and not callable(callback):
        raise TypeError(f"{name} must be callable (a function or a coroutine function)")


async def resolve_metadata(source: MetadataSource) -> MultiDict[Any]:
    """The metadata of one attempt: *source* itself, or what it returns."""
    if callable(source):
        value = source()
        if inspect.isawaitable(value):
            value = await value
        return MultiDict(value or ())
    return MultiDict(source or ())


class Retry:
    """Backoff with jitter, reset after a stable tunnel; permanent refusals."""

    def __init__(
        self,
        *,
        min_backoff: float,
        max_backoff: float,
        jitter: float,
        stable_after: float,
        permanent_statuses: Collection[Status],
        permanent_attempts: int,
    ) -> None:
        if min_backoff <= 0 or max_backoff < min_backoff or not 0 <= jitter < 1:
            raise ValueError("need 0 < min_backoff <= max_backoff and 0 <= jitter < 1")
        if stable_after < 0:
            raise ValueError("stable_after must not be negative")
        if permanent_attempts < 1:
            raise ValueError("permanent_attempts must be at least 1")
        self.min_backoff = min_backoff
        self.max_backoff = max_backoff
        self.jitter = jitter
        self.stable_after = stable_after
        self.permanent_statuses = frozenset(permanent_statuses)
        self.permanent_attempts = permanent_attempts
        self._backoff = min_backoff
        self._refusals = 0

    def opened(self) -> None:
        """A tunnel opened: refusals so far were not permanent after all."""
        self._refusals = 0

    def closed_after(self, up_for: float) -> None:
        """A tunnel that had opened ended after *up_for* seconds."""
        if up_for >= self.stable_after:
            self._backoff = self.min_backoff

    def failed(self, error: BaseException) -> None:
        """An attempt failed; raises *error* if it is a refusal to give up on."""
        if isinstance(error, GRPCError) and error.status in self.permanent_statuses:
            self._refusals += 1
            if self._refusals >= self.permanent_attempts:
                raise error
        else:
            self._refusals = 0

    def next_delay(self) -> float:
        """Seconds to wait before the next attempt (the backoff then grows)."""
        delay = self._backoff * random.uniform(1 - self.jitter, 1 + self.jitter)
        self._backoff = min(self._backoff * 2, self.max_backoff)
        return delay
