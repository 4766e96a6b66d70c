"""Prometheus metrics shared by the router and the agent.

Names are ``grpctunnel_<program>_...`` in base units (seconds, bytes),
counters end in ``_total``, and no label takes a per-key value (an agent
key, a peer): a label per device would grow without bound.  The only
labels are bounded sets: a gRPC status code, a reason from a fixed list.

Two sources:

* ``CallMeter`` counts the calls the program forwards, by the status they
  ended with, and how many are in flight.
* ``TunnelTotals`` turns the library's per-tunnel statistics
  (``TunnelChannel.statistics()``, ``ReverseTunnelServer.statistics()``)
  into metrics: gauges of the open tunnels and, where the program sees
  every tunnel's last statistics when it closes (the router does, in its
  close callback), counters: what open tunnels report now plus what closed
  ones reported, so a counter never goes down when a tunnel ends.
"""

from __future__ import annotations

import asyncio
import contextvars
import dataclasses
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import grpclib.server
from grpclib.const import Status
from grpclib.events import SendTrailingMetadata, listen
from grpclib.exceptions import GRPCError
from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from ..channel import TunnelChannel
from ..fallback import Fallback
from ..raw import RawMessage

__all__ = ["CallMeter", "TunnelTotals", "statistics_of"]

# ``*_created`` series (a timestamp per counter) double the output and say
# nothing a scraper does not know; only the programs import this module.
disable_created_metrics()  # type: ignore[no-untyped-call]

#: Statistics fields that only grow, as (field, metric suffix, help).
_COUNTED = (
    ("streams_opened", "streams_opened_total", "Tunneled streams (calls) opened"),
    ("streams_failed", "streams_failed_total", "Tunneled streams that ended with an error"),
    ("messages_sent", "messages_sent_total", "Messages sent into tunnels"),
    ("messages_received", "messages_received_total", "Messages received from tunnels"),
    ("bytes_sent", "sent_bytes_total", "Message bytes sent into tunnels"),
    ("bytes_received", "received_bytes_total", "Message bytes received from tunnels"),
    (
        "send_wait_seconds",
        "send_wait_seconds_total",
        "Seconds senders waited for a tunnel's flow-control window",
    ),
)


def statistics_of(channel: TunnelChannel) -> dict[str, Any]:
    """A tunnel's ``TunnelStatistics`` as a dict (for JSON and the totals)."""
    return dataclasses.asdict(channel.statistics())


#: The status of the forwarded call running in this task, once its trailers go out.
_call_status: contextvars.ContextVar[list[Status] | None] = contextvars.ContextVar(
    "grpctunnel_call_status", default=None
)


class CallMeter:
    """Counts forwarded calls: wrap the fallback with ``meter.wrap(proxy)``.

    The status is the one the caller gets: the proxy's trailers (seen
    through grpclib's ``SendTrailingMetadata`` event, in the task of the
    call), a ``GRPCError`` the proxy raised, or CANCELLED for a call the
    caller gave up.
    """

    def __init__(self, registry: CollectorRegistry, program: str) -> None:
        prefix = f"grpctunnel_{program}"
        self.calls = Counter(
            f"{prefix}_calls",
            "Calls forwarded, by the gRPC status code the caller got",
            ["code"],
            registry=registry,
        )
        self.in_flight = Gauge(
            f"{prefix}_calls_in_flight", "Forwarded calls running now", registry=registry
        )
        # Read when scraped: nothing to update (and no lock to take) per call.
        self.in_flight.set_function(lambda: self.running)
        self.duration = Histogram(
            f"{prefix}_call_duration_seconds",
            "Seconds from a forwarded call's arrival to its status",
            registry=registry,
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        #: Calls running now (what ``in_flight`` reports).
        self.running = 0
        #: ``calls`` by status, each looked up once (``labels()`` takes a lock).
        self._calls_by_status: dict[Status, Counter] = {}
        self._calls_ok: Counter | None = None
        self._idle = asyncio.Event()
        self._idle.set()

    def _counter(self, status: Status) -> Counter:
        # OK first, by identity: hashing an Enum member runs Python code.
        counter = self._calls_ok if status is Status.OK else self._calls_by_status.get(status)
        if counter is None:
            counter = self._calls_by_status[status] = self.calls.labels(status.name)
            if status is Status.OK:
                self._calls_ok = counter
        return counter

    def listen_on(self, target: Any) -> None:
        """See the trailers of calls served by ``target`` (a Server, a device)."""
        listen(target, SendTrailingMetadata, _on_trailers)

    async def wait_idle(self) -> None:
        """Return once no forwarded call runs."""
        await self._idle.wait()

    def wrap(self, fallback: Fallback) -> Fallback:
        async def metered(
            method_name: str, stream: grpclib.server.Stream[RawMessage, RawMessage]
        ) -> None:
            box: list[Status] = []
            _call_status.set(box)
            loop = asyncio.get_running_loop()
            started = loop.time()
            self.running += 1
            self._idle.clear()
            status = Status.OK
            try:
                await fallback(method_name, stream)
                status = box[-1] if box else Status.OK
            except GRPCError as exc:
                status = exc.status
                raise
            except asyncio.CancelledError:
                status = box[-1] if box else Status.CANCELLED
                raise
            except Exception:
                status = Status.UNKNOWN
                raise
            finally:
                self.running -= 1
                if not self.running:
                    self._idle.set()
                self._counter(status).inc()
                self.duration.observe(loop.time() - started)

        return metered


async def _on_trailers(event: SendTrailingMetadata) -> None:
    box = _call_status.get()
    if box is not None:
        box.append(event.status)


class TunnelTotals(Collector):
    """Counters and gauges from the statistics of every tunnel, open or closed."""

    def __init__(
        self,
        program: str,
        open_tunnels: Callable[[], Iterable[dict[str, Any]]],
    ) -> None:
        self._prefix = f"grpctunnel_{program}_tunnel"
        self._open = open_tunnels
        self._retired: dict[str, float] = {field: 0.0 for field, _, _ in _COUNTED}

    def retire(self, statistics: dict[str, Any]) -> None:
        """A tunnel closed: keep what it counted."""
        for field, _, _ in _COUNTED:
            self._retired[field] += statistics.get(field, 0) or 0

    def collect(self) -> Iterator[Metric]:
        live = list(self._open())
        for field, suffix, text in _COUNTED:
            total = self._retired[field] + sum(s.get(field, 0) or 0 for s in live)
            yield CounterMetricFamily(
                f"{self._prefix}_{suffix.removesuffix('_total')}", text, value=total
            )
        yield GaugeMetricFamily(
            f"{self._prefix}_streams_active",
            "Tunneled streams open now",
            value=sum(s.get("streams_active", 0) or 0 for s in live),
        )
        rtts = [
            s["keepalive_rtt_seconds"] for s in live if s.get("keepalive_rtt_seconds") is not None
        ]
        yield GaugeMetricFamily(
            f"{self._prefix}_keepalive_rtt_seconds_max",
            "The longest last keepalive round trip among open tunnels",
            value=max(rtts, default=0.0),
        )
