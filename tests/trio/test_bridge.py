"""The crossings between trio code and the asyncio layer, one by one."""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Awaitable, Callable

import pytest
import trio
import trio.testing

from tunnel.trio._bridge import (
    Signal,
    asyncio_callable,
    asyncio_kwargs,
    await_asyncio,
    hop,
    in_trio,
)


async def test_async_callbacks_run_as_trio_code_when_asyncio_awaits_them() -> None:
    ran: list[str] = []

    async def trio_callback(value: int) -> int:
        await trio.sleep(0)  # fails unless this runs as a trio task
        ran.append("trio" if in_trio() else "asyncio")
        return value + 1

    # asyncio_callable takes and returns anything; here it wraps an async function.
    wrapped: Callable[[int], Awaitable[int]] = asyncio_callable(trio_callback)
    assert inspect.iscoroutinefunction(wrapped)  # the asyncio layer can tell it is async

    async def asyncio_side() -> int:
        assert not in_trio()
        return await wrapped(41)

    assert await hop(asyncio_side) == 42
    assert ran == ["trio"]


async def test_plain_values_and_sync_callbacks_pass_unchanged() -> None:
    def sync_callback() -> None:
        pass

    kwargs = asyncio_kwargs({"metadata": {"a": "b"}, "cb": sync_callback, "n": 3})
    assert kwargs == {"metadata": {"a": "b"}, "cb": sync_callback, "n": 3}


async def test_signal_wakes_waiters_of_both_flavours() -> None:
    signal = Signal()
    woken: list[str] = []

    async def asyncio_waiter() -> None:
        await signal.wait()
        woken.append("asyncio")

    async def trio_waiter() -> None:
        await signal.wait()
        woken.append("trio")

    async with trio.open_nursery() as nursery:
        nursery.start_soon(trio_waiter)
        nursery.start_soon(hop, asyncio_waiter)
        await trio.testing.wait_all_tasks_blocked()  # both are waiting
        assert woken == []
        signal.set()
    assert sorted(woken) == ["asyncio", "trio"]
    signal.clear()
    assert not signal.is_set()


async def test_await_asyncio_stops_the_work_its_own_way_on_cancel() -> None:
    stopped = asyncio.Event()
    finished: list[str] = []

    async def serve() -> None:
        await stopped.wait()  # ends when stopped, as serve_forever ends on close()
        finished.append("clean")

    with trio.move_on_after(0.05) as scope:
        await await_asyncio(serve(), stop=stopped.set)
    assert scope.cancelled_caught
    assert finished == ["clean"]


async def test_await_asyncio_cancels_work_that_ignores_stop() -> None:
    cancelled: list[bool] = []

    async def stubborn() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            cancelled.append(True)
            raise

    with trio.move_on_after(0.05):
        await await_asyncio(stubborn(), stop=lambda: None, grace=0.05)
    assert cancelled == [True]


async def test_await_asyncio_returns_and_raises_like_the_coroutine() -> None:
    async def value() -> int:
        await asyncio.sleep(0)
        return 7

    async def failing() -> None:
        await asyncio.sleep(0)
        raise ValueError("boom")

    assert await await_asyncio(value()) == 7
    with pytest.raises(ValueError, match="boom"):
        await await_asyncio(failing())
