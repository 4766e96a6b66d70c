"""What the router and the agent do when a process dies, restarts or is told to stop."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import AsyncIterator, Iterator

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.programs.support import Agent, Backend, Router, get, metrics, processes, tunnels
from tests.stubs.pb import test_grpc, test_pb2

TEST_TIMEOUT = 40.0


@pytest.fixture(scope="module")
def backend() -> Iterator[Backend]:
    with processes() as started:
        started.append(Backend())
        yield started[0]  # type: ignore[misc]


@pytest.fixture
async def caller() -> AsyncIterator[list[grpclib.client.Channel]]:
    """Channels the test opens (``grpclib.client.Channel``), closed at the end."""
    channels: list[grpclib.client.Channel] = []
    try:
        yield channels
    finally:
        for channel in channels:
            channel.close()


def stub_for(caller: list[grpclib.client.Channel], router: Router) -> test_grpc.TestServiceStub:
    channel = grpclib.client.Channel("127.0.0.1", router.port)
    caller.append(channel)
    return test_grpc.TestServiceStub(channel)


async def test_agent_killed_mid_call(
    backend: Backend, caller: list[grpclib.client.Channel]
) -> None:
    with processes() as started:
        router = Router()
        started.append(router)
        agent = Agent(router, backend, "doomed")
        started.append(agent)
        stub = stub_for(caller, router)
        async with asyncio.timeout(TEST_TIMEOUT):
            mark = backend.mark()
            call = asyncio.create_task(
                stub.Unary(
                    test_pb2.Message(delay_millis=20_000),
                    metadata={"tunnel-key": "doomed", "x-call-id": "doomed"},
                )
            )
            await backend.event("call", after=mark, id="doomed")
            agent.signal(signal.SIGKILL)
            killed = time.monotonic()
            with pytest.raises(GRPCError) as failure:
                await call
            assert time.monotonic() - killed < 2
            assert failure.value.status is Status.UNAVAILABLE
            await router.event("tunnel_closed", key="doomed")
            assert await tunnels(router.admin) == []
            counted = await metrics(router.admin)
            assert counted[("grpctunnel_router_tunnels_closed_total", (("reason", "lost"),))] == 1
            assert counted[("grpctunnel_router_tunnels", ())] == 0
            assert counted[("grpctunnel_router_calls_total", (("code", "UNAVAILABLE"),))] == 1
            with pytest.raises(GRPCError) as failure:
                await stub.Unary(test_pb2.Message(), metadata={"tunnel-key": "doomed"})
            assert failure.value.status is Status.UNAVAILABLE


async def test_agent_registers_again_after_the_router_restarts(
    backend: Backend, caller: list[grpclib.client.Channel]
) -> None:
    with processes() as started:
        router = Router()
        started.append(router)
        agent = Agent(router, backend, "phoenix")
        started.append(agent)
        mark = agent.mark()
        router.signal(signal.SIGKILL)
        router.wait()
        again = Router(listen=router.address)
        started.append(again)
        async with asyncio.timeout(TEST_TIMEOUT):
            await asyncio.to_thread(agent.wait_connected, after=mark)
            await again.event("tunnel_opened", key="phoenix", instance=agent.instance)
            reply = await stub_for(caller, again).Unary(
                test_pb2.Message(payload=b"back"), metadata={"tunnel-key": "phoenix"}
            )
        assert reply.payload == b"back"


async def test_sigterm_drains_the_router_without_losing_a_call(
    backend: Backend, caller: list[grpclib.client.Channel]
) -> None:
    with processes() as started:
        router = Router()
        started.append(router)
        agent = Agent(router, backend, "drain")
        started.append(agent)
        stub = stub_for(caller, router)
        routed = {"tunnel-key": "drain", "x-call-id": "in-flight"}
        async with asyncio.timeout(TEST_TIMEOUT):
            mark = backend.mark()
            call = asyncio.create_task(
                stub.Unary(test_pb2.Message(payload=b"kept", delay_millis=1500), metadata=routed)
            )
            await backend.event("call", after=mark, id="in-flight")
            router.signal(signal.SIGTERM)
            await router.event("router_draining")
            status, body = await get(router.admin, "/readyz")
            assert status == 503 and "draining" in body
            with pytest.raises(GRPCError) as failure:
                await stub_for(caller, router).Unary(test_pb2.Message(), metadata=routed)
            assert failure.value.status is Status.UNAVAILABLE
            reply = await call
            assert reply.payload == b"kept"
            assert await router.exited() == 0
            closed = router.wait_event("tunnel_closed", key="drain")
            assert closed["reason"] == "the router shut down"
            assert closed["calls"] >= 1


async def test_sigterm_drains_the_agent_without_losing_a_call(
    backend: Backend, caller: list[grpclib.client.Channel]
) -> None:
    with processes() as started:
        router = Router()
        started.append(router)
        agent = Agent(router, backend, "leaving")
        started.append(agent)
        stub = stub_for(caller, router)
        async with asyncio.timeout(TEST_TIMEOUT):
            mark = backend.mark()
            call = asyncio.create_task(
                stub.Unary(
                    test_pb2.Message(payload=b"kept", delay_millis=1500),
                    metadata={"tunnel-key": "leaving", "x-call-id": "agent-drain"},
                )
            )
            await backend.event("call", after=mark, id="agent-drain")
            agent.signal(signal.SIGTERM)
            await agent.event("agent_draining")
            reply = await call
            assert reply.payload == b"kept"
            assert await agent.exited() == 0
            closed = await router.event("tunnel_closed", key="leaving")
            assert closed["reason"] == "the agent closed the tunnel"
            counted = await metrics(router.admin)
            assert counted[("grpctunnel_router_tunnels_closed_total", (("reason", "agent"),))] == 1
            assert counted[("grpctunnel_router_tunnels_closed_total", (("reason", "lost"),))] == 0
