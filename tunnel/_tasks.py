"""Small asyncio helpers for tasks that must end, and callbacks that may await.

Every task this package starts has an owner that cancels it and waits for it
(see ``_tunnel.py``).  Cleanup that waits must itself survive being cancelled
again: grpclib, for one, cancels a handler's task when the connection is lost
and then again when its server closes.  ``cancel_and_wait`` finishes the job
and delivers the interruption afterwards.

Callbacks given to the library may be plain functions or coroutine functions;
``call_back`` runs either, and an exception raised by one is logged with the
callback's name, never lost, and never ends the tunnel that called it.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
from collections.abc import Callable, Iterable
from typing import Any

__all__ = ["call_back", "cancel_and_wait"]

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
