"""``CallMeter`` on its own: what /metrics says about forwarded calls, while and after they run."""

from __future__ import annotations

import asyncio
from typing import Any, cast

import grpclib.server
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from prometheus_client import CollectorRegistry

from tunnel.cli._metrics import CallMeter
from tunnel.fallback import Fallback

TIMEOUT = 10.0
#: The meter never looks at the stream it passes on.
NO_STREAM = cast("grpclib.server.Stream[Any, Any]", None)


def value(registry: CollectorRegistry, name: str, **labels: str) -> float | None:
    return registry.get_sample_value(name, labels)


async def test_calls_in_flight_and_by_status() -> None:
    registry = CollectorRegistry()
    meter = CallMeter(registry, "test")
    release = asyncio.Event()
    started = asyncio.Event()

    async def waits(method_name: str, stream: Any) -> None:
        started.set()
        await release.wait()

    async def refuses(method_name: str, stream: Any) -> None:
        raise GRPCError(Status.NOT_FOUND, "no")

    async def call(fallback: Fallback) -> None:
        await meter.wrap(fallback)("/a.B/C", NO_STREAM)

    async with asyncio.timeout(TIMEOUT):
        running = asyncio.create_task(call(waits))
        await started.wait()
        assert value(registry, "grpctunnel_test_calls_in_flight") == 1
        assert value(registry, "grpctunnel_test_calls_total", code="OK") is None
        release.set()
        await running
        assert value(registry, "grpctunnel_test_calls_in_flight") == 0
        for _ in range(2):
            with pytest.raises(GRPCError):
                await call(refuses)
        await call(waits)
    assert value(registry, "grpctunnel_test_calls_total", code="OK") == 2
    assert value(registry, "grpctunnel_test_calls_total", code="NOT_FOUND") == 2
    assert value(registry, "grpctunnel_test_call_duration_seconds_count") == 4
    assert value(registry, "grpctunnel_test_calls_in_flight") == 0
