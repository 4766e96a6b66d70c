"""Small asyncio helpers for tasks that must end, and callbacks that may await.

Every task this package starts has an owner that cancels it and waits for it
(see ``_tunnel.py``).  Cleanup that waits must itself survive being cancelled
again: grpclib, for one, cancels a handler's task when the connection is lost
and then again when its server closes.  ``cancel_and_wait`` finishes the job
and delivers the interruption afterwards.

Callbacks given to the library may be plain functions or coroutine functions;
``call_back`` runs either, and an exception raised by one is logged with the
callback's name, never lost, and never ends the tunnel that called it.

``Flag`` is ``asyncio.Event`` for what a tunnel keeps by the thousand.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["Flag", "call_back", "cancel_and_wait"]

log = logging.getLogger("tunnel")


async def cancel_and_wait(tasks: Iterable[asyncio.Future[Any]]) -> None:
    """Cancel *tasks* and return once every one of them is done.

    If the calling task is cancelled while it waits, it keeps waiting (the
    tasks were cancelled already and end promptly) and raises
    ``CancelledError`` once they are all done.
    """
    tasks = list(tasks)
    pending = [task for task in tasks if not task.done()]
    for task in pending:
        task.cancel()
    interrupted = False
    while pending:
        try:
            await asyncio.wait(pending)
        except asyncio.CancelledError:
            interrupted = True
        pending = [task for task in pending if not task.done()]
    for task in tasks:
        # Retrieve outcomes so that asyncio does not log them as unretrieved.
        if task.done() and not task.cancelled():
            task.exception()
    if interrupted:
        raise asyncio.CancelledError


async def call_back(callback: Callable[..., Any], *args: Any, what: str) -> Any:
    """Run a user callback, awaiting it if it returned an awaitable.

    Returns what the callback returned; an exception it raised is logged
    (``what`` says which callback it was) and None is returned.
    """
    try:
        result = callback(*args)
        if inspect.isawaitable(result):
            result = await result
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("%s callback %r raised", what, callback)
        return None
    return result


class Flag:
    """``asyncio.Event``'s ``set``, ``clear``, ``is_set`` and ``wait``, made small.

    asyncio's ``Event`` makes a ``collections.deque`` for its waiters when it
    is made: 760 bytes (a deque keeps a block of 64 slots even when empty).
    Each end of a tunnel keeps several such flags (the writer's wake-up, "the
    writer is idle", "no call in flight", "closed"), so an idle tunnel spent
    about 7 KiB on empty deques.  A ``Flag`` keeps its waiters in a list made
    by the first ``wait``.  As with ``Event``, ``set`` wakes every task
    waiting at that moment, even if the flag is cleared before they run.
    """

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        if self._set:
            return
        self._set = True
        waiters = self._waiters
        if waiters:
            self._waiters = None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        """Return once the flag is set (at once if it is)."""
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        waiters = self._waiters
        if waiters is None:
            waiters = self._waiters = []
        waiters.append(waiter)
        try:
            await waiter
        finally:
            waiters = self._waiters
            if waiters is not None and waiter in waiters:
                waiters.remove(waiter)
