"""What the router and the agent do when a process dies, restarts or is told to stop."""

from __future__ import annotations

import asyncio
import signal
import time

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.programs.support import (
    Agent,
    Backend,
    Callers,
    Router,
    get,
    metrics,
    processes,
    reaching_backend,
    tunnels,
)
from tests.stubs.pb import test_pb2

TEST_TIMEOUT = 40.0


async def test_agent_killed_mid_call(backend: Backend, caller: Callers) -> None:
    with processes() as started:
        router = started.add(Router())
        agent = started.add(Agent(router, backend, "doomed"))
        stub = caller.stub(router)
        async with asyncio.timeout(TEST_TIMEOUT):
            call = await reaching_backend(
                backend,
                stub.Unary(
                    test_pb2.Message(delay_millis=20_000),
                    metadata={"tunnel-key": "doomed", "x-call-id": "doomed"},
                ),
                "doomed",
            )
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
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router())
        agent = started.add(Agent(router, backend, "phoenix"))
        async with asyncio.timeout(TEST_TIMEOUT):
            await caller.stub(router).Unary(
                test_pb2.Message(payload=b"first"), metadata={"tunnel-key": "phoenix"}
            )
        mark = agent.mark()
        router.signal(signal.SIGKILL)
        router.wait()
        again = started.add(Router(listen=router.address))
        async with asyncio.timeout(TEST_TIMEOUT):
            await asyncio.to_thread(agent.wait_connected, after=mark)
            await again.event("tunnel_opened", key="phoenix", instance=agent.instance)
            reply = await caller.stub(again).Unary(
                test_pb2.Message(payload=b"back"), metadata={"tunnel-key": "phoenix"}
            )
            counted = await metrics(agent.admin)
        assert reply.payload == b"back"
        # The agent's tunnel counters kept the first tunnel's call.
        assert counted[("grpctunnel_agent_tunnel_streams_opened_total", ())] == 2
        assert counted[("grpctunnel_agent_disconnects_total", ())] == 1


async def test_sigterm_drains_the_router_without_losing_a_call(
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router())
        started.add(Agent(router, backend, "drain"))
        stub = caller.stub(router)
        routed = {"tunnel-key": "drain", "x-call-id": "in-flight"}
        async with asyncio.timeout(TEST_TIMEOUT):
            call = await reaching_backend(
                backend,
                stub.Unary(test_pb2.Message(payload=b"kept", delay_millis=1500), metadata=routed),
                "in-flight",
            )
            router.signal(signal.SIGTERM)
            await router.event("router_draining")
            status, body = await get(router.admin, "/readyz")
            assert status == 503 and "draining" in body
            with pytest.raises(GRPCError) as failure:
                await caller.stub(router).Unary(test_pb2.Message(), metadata=routed)
            assert failure.value.status is Status.UNAVAILABLE
            reply = await call
            assert reply.payload == b"kept"
            assert await router.exited() == 0
            closed = router.wait_event("tunnel_closed", key="drain")
            assert closed["reason"] == "the router shut down"
            assert closed["calls"] >= 1


async def test_sigterm_drains_the_agent_without_losing_a_call(
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router())
        agent = started.add(Agent(router, backend, "leaving"))
        stub = caller.stub(router)
        async with asyncio.timeout(TEST_TIMEOUT):
            call = await reaching_backend(
                backend,
                stub.Unary(
                    test_pb2.Message(payload=b"kept", delay_millis=1500),
                    metadata={"tunnel-key": "leaving", "x-call-id": "agent-drain"},
                ),
                "agent-drain",
            )
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
