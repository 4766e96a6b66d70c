"""pytest-trio tests of ``tunnel.trio``, beside the asyncio suite.

The rest of the suite runs under pytest-asyncio in auto mode, which claims
every ``async def`` test and fixture.  Here every ``async def`` test is
handed to pytest-trio instead:

* at collection, the test's function is hidden from pytest-asyncio behind a
  plain function (so it does not become an asyncio item) and the test is
  marked ``trio``;
* when it runs, the real coroutine goes back, wrapped by :func:`_run_clean`,
  and pytest-trio runs it in ``trio.run``.

Tests here take no async fixtures (pytest-asyncio would claim those too);
they use the async context managers of ``tests/trio/support.py`` instead.

:func:`_run_clean` opens ``tunnel.trio.open_loop()`` around the test (the
one thing every trio program using tunnels does first) and fails the test
if, when its body returns, an asyncio task or a trio task that it started
is still running: ``open_loop`` would cancel such leftovers silently on
exit, so they are looked for before it exits.
"""

from __future__ import annotations

import asyncio
import functools
import inspect
from collections.abc import Awaitable, Callable, Generator, Iterator
from typing import Any

import pytest
import trio

import tunnel.trio

#: How long finishing tasks get before they count as leaked (seconds); a
#: closed tunnel's tasks end within a few loop rounds.
LEAK_GRACE = 2.0


@pytest.fixture(autouse=True)
def no_leaked_tasks() -> Iterator[None]:
    """The suite's asyncio leak check does not apply: :func:`_run_clean` checks here."""
    yield


def _trio_tasks() -> set[trio.lowlevel.Task]:
    tasks: set[trio.lowlevel.Task] = set()
    stack = [trio.lowlevel.current_root_task()]
    while stack:
        task = stack.pop()
        if task is None:
            continue
        tasks.add(task)
        for nursery in task.child_nurseries:
            stack.extend(nursery.child_tasks)
    return tasks


def _leftovers(loop: asyncio.AbstractEventLoop, trio_before: set[trio.lowlevel.Task]) -> list[str]:
    me = trio.lowlevel.current_task()
    pending = [t for t in asyncio.all_tasks(loop) if not t.done()]
    trio_left = [t for t in _trio_tasks() - trio_before if t is not me]
    return [f"  asyncio {t!r}" for t in pending] + [f"  trio {t.name}" for t in trio_left]


async def _run_clean(test: Callable[..., Awaitable[None]], **kwargs: Any) -> None:
    async with tunnel.trio.open_loop() as loop:
        trio_before = _trio_tasks()
        await test(**kwargs)
        left = _leftovers(loop, trio_before)
        with trio.move_on_after(LEAK_GRACE):
            while left:
                await trio.sleep(0)
                left = _leftovers(loop, trio_before)
        if left:
            pytest.fail("task(s) still running after the test:\n" + "\n".join(left))


#: The trio test behind each stand-in that collection put in its place.
_TRIO_TESTS: dict[Callable[..., None], Callable[..., Awaitable[None]]] = {}


@pytest.hookimpl(hookwrapper=True, trylast=True)
def pytest_pycollect_makeitem(
    collector: pytest.Collector, name: str, obj: object
) -> Generator[None, Any, None]:
    outcome = yield
    result = outcome.get_result()
    items = result if isinstance(result, list) else [result]
    for item in items:
        if isinstance(item, pytest.Function) and inspect.iscoroutinefunction(item.obj):
            test = item.obj

            @functools.wraps(test)
            def not_for_asyncio(*args: Any, **kwargs: Any) -> None:
                raise AssertionError("a trio test must run under pytest-trio")

            _TRIO_TESTS[not_for_asyncio] = test
            item.obj = not_for_asyncio
            item.add_marker(pytest.mark.trio)


@pytest.hookimpl(hookwrapper=True, tryfirst=True)
def pytest_runtest_call(item: pytest.Item) -> Generator[None, Any, None]:
    if isinstance(item, pytest.Function) and (test := _TRIO_TESTS.get(item.obj)) is not None:

        @functools.wraps(test)
        async def clean(**kwargs: Any) -> None:
            await _run_clean(test, **kwargs)

        item.obj = clean
    yield
