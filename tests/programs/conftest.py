"""Fixtures shared by the programs' tests: one backend per module, callers per test."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.programs.cluster import RedisServer
from tests.programs.support import Backend, Callers, processes


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    """A TestService backend process that reports its calls (shared: it keeps no state)."""
    with processes() as started:
        yield started.add(Backend())


@pytest.fixture
async def caller() -> AsyncIterator[Callers]:
    callers = Callers()
    try:
        yield callers
    finally:
        callers.close()


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    """A redis-server of the test's own (the replicas' registry), stopped by PID after it."""
    server = RedisServer()
    try:
        yield server
    finally:
        server.stop()
