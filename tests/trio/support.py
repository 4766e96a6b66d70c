"""Servers, devices and services for the trio tests, as async context managers.

pytest-asyncio claims async fixtures, so the trio tests build what they need
with these instead.  Everything here is trio code on ``tunnel.trio``, and
everything it starts ends when its ``async with`` does.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import AsyncIterator, Collection, Hashable
from dataclasses import dataclass, field
from typing import Any

import grpclib.client
import grpclib.server
import trio
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
import tunnel.trio
from tests.stubs.pb import test_grpc, test_pb2
from tunnel.testing.service import TestService

#: Upper bound for anything a test waits for (seconds).
TIMEOUT = 10.0

DEVICE_KEY = "device-id"


def device_key(channel: tunnel.TunnelChannel) -> Hashable:
    """The affinity key of a reverse tunnel: its ``device-id`` metadata."""
    return channel.metadata.get(DEVICE_KEY)


@dataclass
class Seen:
    """What a trio handler saw, for the test to check from outside."""

    received: trio.Event = field(default_factory=trio.Event)
    #: Set by the test to let calls with the payload ``b"hold"`` finish.
    release: trio.Event = field(default_factory=trio.Event)
    started: trio.Event = field(default_factory=trio.Event)
    cancelled: trio.Event = field(default_factory=trio.Event)
    finished: trio.Event = field(default_factory=trio.Event)
    metadata: list[dict[str, Any]] = field(default_factory=list)
    most_at_once: int = 0


class TrioTestService(test_grpc.TestServiceBase):
    """grpchantesting.TestService written as trio code (grpclib-style handlers).

    Unary replies ``<name>:<payload>``, after taking a trio lock and running
    its work in a nursery inside a cancel scope; a request whose payload is
    ``b"block"`` blocks until cancelled (recorded in ``seen``), one whose
    payload is ``b"hold"`` waits for ``seen.release``, and a
    non-zero ``code`` fails the call with that status.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self.seen = Seen()
        self._lock = trio.Lock()
        self._running = 0

    async def Unary(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        self.seen.metadata.append(dict(stream.metadata or {}))
        self.seen.received.set()
        if request.payload == b"hold":
            self.seen.started.set()
            await self.seen.release.wait()
        if request.payload == b"block":
            self.seen.started.set()
            try:
                await trio.sleep_forever()
            except trio.Cancelled:
                self.seen.cancelled.set()
                raise
        if request.code:
            raise GRPCError(Status(request.code), f"{self.name} says no")
        parts: list[bytes] = []
        with trio.CancelScope() as scope:
            scope.deadline = trio.current_time() + TIMEOUT
            async with trio.open_nursery() as nursery:

                async def work() -> None:
                    async with self._lock:
                        self._running += 1
                        self.seen.most_at_once = max(self.seen.most_at_once, self._running)
                        await trio.sleep(request.delay_millis / 1000)
                        self._running -= 1
                    parts.append(self.name.encode() + b":" + request.payload)

                nursery.start_soon(work)
        await stream.send_initial_metadata(metadata={"x-handled-by": self.name})
        await stream.send_message(test_pb2.Message(payload=b"".join(parts)))
        await stream.send_trailing_metadata(metadata={"x-trailer": "trio"})
        self.seen.finished.set()

    async def ClientStream(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        count = 0
        async for _ in stream:
            count += 1
            await trio.sleep(0)
        await stream.send_message(test_pb2.Message(count=count))

    async def ServerStream(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        for i in range(request.count):
            await trio.sleep(0)
            await stream.send_message(test_pb2.Message(payload=request.payload, count=i))

    async def BidiStream(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        async with trio.open_nursery() as nursery:
            send, receive = trio.open_memory_channel[Any](0)

            async def reply() -> None:
                async with receive:
                    async for message in receive:
                        await stream.send_message(message)

            nursery.start_soon(reply)
            async with send:
                async for message in stream:
                    await send.send(message)

    async def UseExternalMessageTwice(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.recv_message()
        raise GRPCError(Status.UNIMPLEMENTED)


@dataclass
class NetworkServer:
    """A running ``tunnel.trio.serve`` with a tunnel handler."""

    port: int
    handler: tunnel.trio.TunnelServiceHandler
    scope: trio.CancelScope
    stopped: trio.Event

    async def stop(self) -> None:
        """Cancel the server (as a trio program would) and wait until it is closed."""
        self.scope.cancel()
        with trio.fail_after(TIMEOUT):
            await self.stopped.wait()


@contextlib.asynccontextmanager
async def network_server(
    forward: Collection[Any] = (),
    *,
    port: int = 0,
    **handler_kwargs: Any,
) -> AsyncIterator[NetworkServer]:
    """A grpclib server on 127.0.0.1 serving ``TunnelService`` from trio.

    ``forward`` are the services tunneled calls reach (trio code, or
    ``tunnel.trio.asyncio_handlers``); reverse tunnels are pooled by
    ``device-id``.  The server runs in a cancel scope of its own, so that
    stopping it never cancels the test's code.
    """
    handler_kwargs.setdefault("affinity_key", device_key)
    handler = tunnel.trio.TunnelServiceHandler(forward, **handler_kwargs)
    scope = trio.CancelScope()
    stopped = trio.Event()

    async def run(task_status: trio.TaskStatus[int]) -> None:
        try:
            with scope:
                await tunnel.trio.serve([handler], "127.0.0.1", port, task_status=task_status)
        finally:
            stopped.set()

    async with trio.open_nursery() as nursery:
        with trio.fail_after(TIMEOUT):
            bound = await nursery.start(run)
        server = NetworkServer(bound, handler, scope, stopped)
        try:
            yield server
        finally:
            scope.cancel()


def asyncio_test_service() -> Any:
    """The asyncio TestService of tunnel.testing (echoes metadata, honours codes)."""
    return tunnel.trio.asyncio_handlers(TestService())


@contextlib.asynccontextmanager
async def grpclib_channel(port: int) -> AsyncIterator[grpclib.client.Channel]:
    channel = grpclib.client.Channel("127.0.0.1", port)
    try:
        yield channel
    finally:
        channel.close()


@contextlib.asynccontextmanager
async def device(
    port: int, services: Collection[Any], key: str, **serve_kwargs: Any
) -> AsyncIterator[tunnel.trio.ReverseTunnelServer]:
    """A trio device serving ``services`` over reverse tunnels (``serve_forever``)."""
    async with grpclib_channel(port) as channel, trio.open_nursery() as nursery:
        server = tunnel.trio.ReverseTunnelServer(channel, services)
        nursery.start_soon(
            functools.partial(server.serve_forever, {DEVICE_KEY: key}, **serve_kwargs)
        )
        yield server
        nursery.cancel_scope.cancel()
