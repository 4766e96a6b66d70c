"""``open_loop()``: trio-asyncio's loop, with Ctrl-C made safe for it.

Trio turns SIGINT into ``KeyboardInterrupt`` raised *at once*, in whatever
unprotected code is running, when the signal arrives.  Under trio-asyncio
that may be the task that runs every asyncio callback: the interrupt then
lands between two steps of the tunnel's asyncio machinery (or of grpclib's),
and the shutdown that follows waits for tasks that can no longer run.  Seen
here: a device program sent SIGINT while it opened its tunnel hung until
killed.

So while the loop is open, SIGINT is taken in hand: the first Ctrl-C cancels
the body of ``async with open_loop():`` (every tunnel ends as on any trio
cancellation, bounded in time), and ``KeyboardInterrupt`` is raised once it
has unwound and the loop is closed.  A second Ctrl-C, during that unwinding,
gets trio's own handling again (an immediate ``KeyboardInterrupt``).
Off the main thread (where signals cannot be received) nothing changes.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
from collections.abc import AsyncIterator

import trio
import trio_asyncio

__all__ = ["open_loop"]


async def _watch_sigint(body: trio.CancelScope, interrupted: trio.Event, ready: trio.Event) -> None:
    """Cancel ``body`` on the first SIGINT, then give SIGINT back to trio."""
    with trio.open_signal_receiver(signal.SIGINT) as signals:
        ready.set()
        async for _ in signals:
            interrupted.set()
            body.cancel()
            return


@contextlib.asynccontextmanager
async def open_loop() -> AsyncIterator[asyncio.AbstractEventLoop]:
    """Run the asyncio loop the tunnels need on trio, around the body.

    Open it once, around everything that uses ``tunnel.trio``.  Ctrl-C
    cancels the body and raises ``KeyboardInterrupt`` when it has ended (see
    the module docstring).
    """
    interrupted = trio.Event()
    async with trio_asyncio.open_loop() as loop:
        with trio.CancelScope() as body:
            watcher = trio.CancelScope()
            if threading.current_thread() is threading.main_thread():
                ready = trio.Event()

                async def watch() -> None:
                    with watcher:
                        await _watch_sigint(body, interrupted, ready)

                trio.lowlevel.spawn_system_task(watch, name="tunnel.trio SIGINT watcher")
                await ready.wait()
            try:
                yield loop
            finally:
                watcher.cancel()
    if interrupted.is_set():
        # Not chained to the cancellation that unwound the body: that was ours.
        raise KeyboardInterrupt from None
