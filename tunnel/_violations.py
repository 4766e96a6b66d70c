"""Tunnels that a peer broke: the status that ends them, and one log line.

Anyone who can open a tunnel can break the protocol on purpose, as often as
they like (an undecodable frame, an oversized one, a stream id reused).
Each such tunnel ends with its carrying call's status, ``INTERNAL`` or
``RESOURCE_EXHAUSTED`` "tunnel protocol error: ...", which is all the peer
needs.  The operator gets one concise line per tunnel (logger ``tunnel``,
WARNING, no traceback: the fault is the peer's, not ours), and no more than
``LINES`` of them per ``PERIOD`` seconds whatever the peers do; the next
line after a quiet spell says how many were left out.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from grpclib.exceptions import GRPCError
from grpclib.protocol import Peer

from ._tunnel import as_status
from .errors import RemoteProtocolError

__all__ = ["LINES", "PERIOD", "RateLimitedLog", "end_carrying_call"]

#: At most this many lines ...
LINES = 10
#: ... per this many seconds.
PERIOD = 60.0


class RateLimitedLog:
    """A logger's WARNING lines, at most ``lines`` per ``period`` seconds."""

    def __init__(
        self,
        logger: logging.Logger,
        *,
        lines: int = LINES,
        period: float = PERIOD,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._logger = logger
        self._lines = lines
        self._period = period
        self._clock = clock
        self._window_start = -period
        self._logged = 0
        self._suppressed = 0

    def warning(self, message: str) -> bool:
        """Log ``message`` unless this period's lines are spent; True if logged."""
        now = self._clock()
        if now - self._window_start >= self._period:
            self._window_start = now
            self._logged = 0
        if self._logged >= self._lines:
            self._suppressed += 1
            return False
        self._logged += 1
        if self._suppressed:
            message = f"{message} ({self._suppressed} similar lines left out before this one)"
            self._suppressed = 0
        self._logger.warning("%s", message)
        return True


_log = RateLimitedLog(logging.getLogger("tunnel"))


def end_carrying_call(exc: Exception, *, kind: str, peer: Peer | None) -> GRPCError:
    """The status that ends a carrying call this end serves (``as_status``).

    A tunnel the peer broke (``RemoteProtocolError``) is also logged, in
    one line and at a bounded rate.  ``kind`` is "forward" or "reverse".
    Raise the result from the handler of the carrying call.
    """
    error = as_status(exc)
    if isinstance(exc, RemoteProtocolError):
        addr = peer.addr() if peer is not None else None
        where = f"{addr[0]}:{addr[1]}" if addr else "an unknown peer"
        _log.warning(f"{kind} tunnel from {where} ended: {error.status.name} {error.message}")
    return error
