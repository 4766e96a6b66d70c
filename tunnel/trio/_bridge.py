"""Crossing between trio code and the asyncio layer, on trio-asyncio's loop.

The tunnel's machinery (reader and writer tasks, grpclib's HTTP/2 I/O) runs
as asyncio code on the loop that ``trio_asyncio.open_loop()`` runs inside
trio.  Trio code reaches it in one of three ways, cheapest first:

* a plain function call: everything the protocol core and the driver offer
  to a call (queue a frame, wake the writer) is synchronous, so trio code
  calls it directly, no crossing at all;
* ``Signal``: a flag that the asyncio side sets and either flavour waits on,
  which is how a tunneled call waits for its peer without a crossing;
* a *hop* (``aio_as_trio``): a whole asyncio coroutine run as one asyncio
  task while the trio task waits.  Used once per tunnel, per ``serve``, or
  when a sender must wait for the writer (more than a window queued).

``in_trio()`` tells which flavour the running code is: trio-asyncio marks
asyncio callbacks and task steps as "asyncio" for sniffio, and trio tasks
are "trio".  Code that may be awaited from both (a call's stream, which
betterproto's bidi stubs feed from an asyncio task) picks its way to wait
by it.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Coroutine, Mapping
from typing import Any, TypeVar

import sniffio
import trio
import trio_asyncio

from .. import _seam

# trio-asyncio is imported by now; grpclib may have been imported before it.
_seam.follow_asyncio_current_task()

__all__ = [
    "Signal",
    "asyncio_args",
    "asyncio_callable",
    "asyncio_kwargs",
    "await_asyncio",
    "hop",
    "in_trio",
    "require_loop",
    "trio_flavoured",
]

T = TypeVar("T")

#: Seconds that cancelled asyncio work gets to finish before it is cut off
#: (asyncio-side cancellation); a bound, so a trio cancel never hangs.
CANCEL_GRACE = 5.0


def in_trio() -> bool:
    """True in a trio task, False in asyncio code (trio-asyncio's loop included)."""
    try:
        return sniffio.current_async_library() == "trio"
    except sniffio.AsyncLibraryNotFoundError:
        return False


def require_loop() -> asyncio.AbstractEventLoop:
    """The trio-asyncio loop this trio code runs under, or a clear error."""
    loop: asyncio.AbstractEventLoop | None = trio_asyncio.current_loop.get()
    if loop is None or loop.is_closed():
        raise RuntimeError(
            "tunnel.trio needs an asyncio loop running on trio: "
            "wrap the code in `async with tunnel.trio.open_loop():`"
        )
    return loop


class Signal:
    """A flag set by either flavour and awaited by either flavour.

    It stands where the asyncio layer keeps an ``asyncio.Event`` for "something
    changed on this call" (``set``/``clear``/``wait``/``is_set``): the asyncio
    side sets it from its reader task, and a trio task waits on it without a
    hop.  Each flavour waits on its own kind of event; ``set`` sets both.
    """

    __slots__ = ("_aio", "_trio")

    def __init__(self, already_set: bool = False) -> None:
        self._aio = asyncio.Event()
        self._trio = trio.Event()
        if already_set:
            self.set()

    def set(self) -> None:
        self._aio.set()
        self._trio.set()

    def clear(self) -> None:
        self._aio.clear()
        if self._trio.is_set():
            self._trio = trio.Event()

    def is_set(self) -> bool:
        return self._aio.is_set()

    async def wait(self) -> None:
        if in_trio():
            await self._trio.wait()
        else:
            await self._aio.wait()


async def hop(func: Callable[..., Awaitable[T]], /, *args: Any, **kwargs: Any) -> T:
    """Run asyncio ``func(*args, **kwargs)`` as an asyncio task; wait from trio.

    Cancelling the trio caller cancels the asyncio task (trio-asyncio's
    ``aio_as_trio``), and its ``CancelledError`` comes out as ``trio.Cancelled``.
    """
    require_loop()
    result: T = await trio_asyncio.aio_as_trio(func)(*args, **kwargs)
    return result


async def await_asyncio(
    coro: Coroutine[Any, Any, T],
    *,
    stop: Callable[[], object] | None = None,
    grace: float = CANCEL_GRACE,
) -> T:
    """Run ``coro`` as an asyncio task until it ends; trio-cancellable, cleanly.

    For long-running asyncio work (serving a tunnel) a trio cancel should end
    it the way the work itself ends best: ``stop()`` (``close()``, say) if
    given, else an asyncio cancel.  The caller then waits, shielded, up to
    ``grace`` seconds for the task to finish, so nothing it owns outlives the
    trio scope; work that does not finish by then is cancelled outright.
    """
    loop = require_loop()
    task = loop.create_task(coro)
    done = trio.Event()
    task.add_done_callback(lambda _: done.set())
    try:
        await done.wait()
    except BaseException:
        if not task.done():
            (stop or task.cancel)()
            with trio.CancelScope(shield=True):
                with trio.move_on_after(grace):
                    await done.wait()
                if not task.done():
                    task.cancel()
                    with trio.move_on_after(grace):
                        await done.wait()
        if task.done() and not task.cancelled():
            task.exception()  # retrieved: the trio exception is what the caller sees
        raise
    return task.result()


def trio_flavoured(func: Callable[..., Awaitable[T]]) -> Callable[..., Awaitable[T]]:
    """An asyncio-awaitable function that runs trio ``func`` as a trio task.

    Cancelling the asyncio side (a deadline, a reset call, the end of a
    tunnel) cancels the trio task, and the other way round.
    """

    @functools.wraps(func)
    async def run(*args: Any, **kwargs: Any) -> T:
        result: T = await trio_asyncio.trio_as_aio(func)(*args, **kwargs)
        return result

    return run


def asyncio_callable(value: Any) -> Any:
    """``value`` as the asyncio layer should get it: async functions run as trio code.

    Callbacks a trio program passes (``metadata=`` providers, open/close
    hooks) are trio code if they are ``async def`` functions (or bound
    methods); the asyncio layer awaits them in asyncio, so they are wrapped
    to run as trio tasks.  Anything else passes unchanged, objects with an
    async ``__call__`` included: those come from libraries (``tunnel.Proxy``)
    and are asyncio code.
    """
    if inspect.iscoroutinefunction(value):
        return trio_flavoured(value)
    return value


def asyncio_args(args: tuple[Any, ...]) -> list[Any]:
    """Positional arguments for the asyncio layer, async callables made trio code."""
    return [asyncio_callable(value) for value in args]


def asyncio_kwargs(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """Keyword arguments for the asyncio layer, async callables made trio code."""
    return {name: asyncio_callable(value) for name, value in kwargs.items()}
