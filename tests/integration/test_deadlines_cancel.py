"""Deadlines and cancellation, from either side of a tunneled call."""

from __future__ import annotations

import asyncio

import grpclib.client
import grpclib.server
import pytest
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline

import tunnel
from tests.integration.support import (
    CARDINALITY,
    FLOW_CONTROL,
    TEST_TIMEOUT,
    Probe,
    connected,
    fc_id,
    options,
    probe_call,
    serving,
    tunnel_over,
)
from tunnel.testing._pb.grpchantesting import Message

ServerStream = grpclib.server.Stream[Message, Message]


class Waiter:
    """Handlers that record their deadline, wait forever, and note cancellation."""

    def __init__(self) -> None:
        self.deadlines: list[Deadline | None] = []
        self.remaining: list[float] = []
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()

    async def wait(self, stream: ServerStream) -> None:
        self.deadlines.append(stream.deadline)
        if stream.deadline is not None:
            self.remaining.append(stream.deadline.time_remaining())
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def cancel_self(self, stream: ServerStream) -> None:
        await stream.recv_message()
        await stream.cancel()

    def service(self) -> Probe:
        return Probe(
            **{kind: (cardinality, self.wait) for kind, cardinality in CARDINALITY.items()},
            CancelSelf=(Cardinality.UNARY_UNARY, self.cancel_self),
            CancelSelfStream=(Cardinality.STREAM_STREAM, self.cancel_self),
        )


async def wait_with_timeout(channel: grpclib.client.Channel, kind: str, timeout: float) -> None:
    async with probe_call(channel, kind, CARDINALITY[kind], timeout=timeout) as stream:
        await stream.send_message(Message(payload=b"x"))
        await stream.recv_message()


@pytest.mark.parametrize("kind", list(CARDINALITY))
@pytest.mark.parametrize("tunneled", [False, True], ids=["direct", "tunneled"])
async def test_local_deadline_raises_timeout_error(kind: str, tunneled: bool) -> None:
    waiter = Waiter()
    service = waiter.service()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([service, tunnel.TunnelServiceHandler([service])]) as served,
        connected(served.port) as direct,
        tunnel_over(served.port) as through_tunnel,
    ):
        channel = through_tunnel if tunneled else direct
        loop = asyncio.get_running_loop()
        started = loop.time()
        with pytest.raises(asyncio.TimeoutError):
            await wait_with_timeout(channel, kind, 0.3)
        assert 0.25 < loop.time() - started < 2.0
        # grpc-timeout travelled: the handler saw (a little less of) our deadline.
        assert waiter.deadlines[0] is not None
        assert 0.1 < waiter.remaining[0] <= 0.3
        async with asyncio.timeout(5):
            await waiter.cancelled.wait()


async def test_local_deadline_leaves_the_callers_task_usable() -> None:
    """After a tunneled call's deadline, the caller's task is not left "cancelling".

    grpclib's own deadline handling leaves ``Task.cancelling()`` raised, so a
    later ``asyncio.timeout()`` in the same task would misread its state; a
    tunneled call takes back the cancellation it caused.
    """
    waiter = Waiter()
    service = waiter.service()
    async with (
        serving([service, tunnel.TunnelServiceHandler([service])]) as served,
        tunnel_over(served.port) as through_tunnel,
    ):
        task = asyncio.current_task()
        assert task is not None
        with pytest.raises(asyncio.TimeoutError):
            await wait_with_timeout(through_tunnel, "Unary", 0.1)
        assert task.cancelling() == 0
        # A timeout of the task's own still behaves: it fires, as TimeoutError.
        with pytest.raises(TimeoutError):
            async with asyncio.timeout(0.01):
                await asyncio.Event().wait()
        async with asyncio.timeout(5):
            await waiter.cancelled.wait()


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_handler_deadline_cancels_the_handler(disable_fc: bool) -> None:
    """The server enforces the deadline itself: DEADLINE_EXCEEDED, handler cancelled.

    The stream is used without ``async with``, so no local timer runs and
    only the handler's deadline can end the call.
    """
    waiter = Waiter()
    opts = options(disable_flow_control=disable_fc)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([waiter.service()], options=opts)]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        stream = probe_call(channel, "Unary", Cardinality.UNARY_UNARY, timeout=0.3)
        try:
            await stream.send_message(Message())
            with pytest.raises(GRPCError) as exc_info:
                async with asyncio.timeout(5):
                    # The tunnel always sends response headers before the
                    # status, so the error comes with the trailers (grpclib
                    # would answer trailers-only and raise at recv_message).
                    assert await stream.recv_message() is None
                    await stream.recv_trailing_metadata()
            assert exc_info.value.status is Status.DEADLINE_EXCEEDED
            assert waiter.cancelled.is_set()
        finally:
            await stream.__aexit__(None, None, None)
        # No deadline, no grpc-timeout: the handler sees none.
        waiter.started.clear()
        stream = probe_call(channel, "Unary", Cardinality.UNARY_UNARY)
        task = asyncio.create_task(stream.send_message(Message()))
        await waiter.started.wait()
        assert len(waiter.deadlines) == 2
        assert waiter.deadlines[1] is None
        await task
        await stream.cancel()
        await stream.__aexit__(None, None, None)


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
@pytest.mark.parametrize("kind", list(CARDINALITY))
async def test_client_cancel_cancels_the_handler(kind: str, disable_fc: bool) -> None:
    waiter = Waiter()
    opts = options(disable_flow_control=disable_fc)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([waiter.service()], options=opts)]) as served,
        tunnel_over(served.port, opts=opts) as channel,
    ):
        async with probe_call(channel, kind, CARDINALITY[kind]) as stream:
            await stream.send_message(Message())
            await waiter.started.wait()
            await stream.cancel()
        async with asyncio.timeout(5):
            await waiter.cancelled.wait()

        # Cancelling the caller's task does the same.
        waiter.started.clear()
        waiter.cancelled.clear()

        async def call() -> None:
            async with probe_call(channel, kind, CARDINALITY[kind]) as stream:
                await stream.send_message(Message())
                await stream.recv_message()

        task = asyncio.create_task(call())
        await waiter.started.wait()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        async with asyncio.timeout(5):
            await waiter.cancelled.wait()
        assert channel.error is None and not channel.closed


@pytest.mark.parametrize("method", ["CancelSelf", "CancelSelfStream"])
async def test_handler_cancel_reaches_the_caller(method: str) -> None:
    waiter = Waiter()
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([waiter.service()])]) as served,
        tunnel_over(served.port) as channel,
    ):
        cardinality = (
            Cardinality.UNARY_UNARY if method == "CancelSelf" else Cardinality.STREAM_STREAM
        )
        with pytest.raises(GRPCError) as exc_info:
            async with probe_call(channel, method, cardinality) as stream:
                await stream.send_message(Message())
                await stream.recv_message()
        assert exc_info.value.status is Status.CANCELLED
        assert channel.error is None and not channel.closed
