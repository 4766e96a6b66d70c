"""Router replicas when a router or the registry fails, or is told to stop.

Each test builds its own small cluster (a redis-server, two or three
routers, agents) and breaks it: kill -9 of a router, SIGTERM of a router,
Redis killed and restarted.  Times are measured from the failure to the
first call that succeeds again, and bounded by what the settings promise
(the agents' backoff, the registry's TTL, one refresh interval).
"""

from __future__ import annotations

import asyncio
import signal
import time
from pathlib import Path

import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.programs.cluster import TTL, Balancer, RedisServer, Replica, opened_on, secret_file
from tests.programs.support import (
    Agent,
    Backend,
    Callers,
    get,
    metrics,
    processes,
    reaching_backend,
)
from tests.stubs.pb import test_grpc, test_pb2

TEST_TIMEOUT = 45.0
#: The agents' longest reconnect delay (FAST_AGENT's --max-backoff) and its jitter.
MAX_BACKOFF = 0.3 * 1.2
#: One refresh of the registry.
REFRESH = TTL / 3
#: Slack for process scheduling on a loaded 2-core machine.
SLACK = 2.0


async def _holders(redis: RedisServer, key: str) -> list[str]:
    """The routers whose registry entry for ``key`` has not expired."""
    async with redis.client() as client:
        now_s, now_us = await client.time()
        now = now_s * 1000 + now_us // 1000
        members = await client.zrangebyscore(f"grpctunnel:{{{key}}}:routers", now, "+inf")
    holders = []
    for member in members:
        assert isinstance(member, str)  # the client decodes responses
        holders.append(member.split('"')[1])
    return sorted(holders)


async def _first_success(
    stub: test_grpc.TestServiceStub, key: str, limit: float
) -> tuple[float, list[str]]:
    """Call until a call for ``key`` succeeds: (when, the failures before it)."""
    failures: list[str] = []
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        started = time.monotonic()
        try:
            reply = await stub.Unary(
                test_pb2.Message(payload=key.encode()), metadata={"tunnel-key": key}, timeout=5
            )
        except GRPCError as exc:
            # Every failed call ends at once: no hang on a stale entry.
            assert time.monotonic() - started < 1.5, (exc, time.monotonic() - started)
            assert exc.status is Status.UNAVAILABLE, exc
            failures.append(exc.message or "")
            await asyncio.sleep(0.02)  # pacing of the retries, not synchronisation
            continue
        assert reply.payload == key.encode()
        return time.monotonic(), failures
    raise AssertionError(f"no call for {key!r} succeeded within {limit} s: {failures[-3:]}")


async def test_kill_9_of_a_router(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    with processes() as started:
        routers = [started.add(Replica(redis_server, f"r{i}", secret)) for i in (1, 2, 3)]
        balancer = started.add(Balancer(*routers))
        keys = [f"d{i}" for i in range(6)]
        agents = {
            key: started.add(Agent(balancer.address, backend, key, wait=False)) for key in keys
        }
        # An agent that names every router has a tunnel on each.
        everywhere = started.add(Agent(routers, backend, "everywhere"))
        async with asyncio.timeout(TEST_TIMEOUT):
            where = {
                key: await asyncio.to_thread(opened_on, routers, agent.instance)
                for key, agent in agents.items()
            }
            victim = where[keys[0]]
            assert {r.router_id for r in where.values()} == {"r1", "r2", "r3"}  # spread
            orphans = [key for key in keys if where[key] is victim]
            survivor = next(r for r in routers if r is not victim)
            stub = caller.stub(survivor)

            victim.signal(signal.SIGKILL)
            killed = time.monotonic()
            # Its key stays reachable through the other routers' tunnels, at once.
            reply = await stub.Unary(
                test_pb2.Message(), metadata={"tunnel-key": "everywhere"}, timeout=5
            )
            assert reply is not None and everywhere.process.poll() is None
            recovered = {}
            for key in orphans:
                when, _ = await _first_success(stub, key, MAX_BACKOFF + TTL + 10)
                recovered[key] = when - killed
            # Its stale entries are still in the registry for up to the TTL;
            # calls through them were tried, found unreachable, and went on.
            counted = await metrics(survivor.admin)
            unreachable = ("grpctunnel_router_peer_forwards_total", (("result", "unreachable"),))
            times = ", ".join(f"{key} {seconds:.3f} s" for key, seconds in recovered.items())
            print(
                f"\nkill -9: calls succeed again after {times} (agents' backoff <= "
                f"{MAX_BACKOFF} s, TTL {TTL} s); {counted[unreachable]:.0f} forwards found "
                "the dead router unreachable"
            )
            assert max(recovered.values()) < MAX_BACKOFF + TTL + SLACK
            for key in keys:
                reply = await stub.Unary(
                    test_pb2.Message(), metadata={"tunnel-key": key}, timeout=5
                )
                assert reply is not None
            # After the TTL the dead router's entries no longer count.
            await asyncio.sleep(max(0.0, killed + TTL + 0.2 - time.monotonic()))
            for key in keys:
                assert victim.router_id not in await _holders(redis_server, key)


async def test_sigterm_of_a_router(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    with processes() as started:
        r1 = started.add(Replica(redis_server, "r1", secret, "--wait-for-tunnel", "5"))
        r2 = started.add(Replica(redis_server, "r2", secret, "--wait-for-tunnel", "5"))
        # The balancer sends the first connection to r2: the leaving router.
        balancer = started.add(Balancer(r2, r1))
        leaving = started.add(Agent(balancer.address, backend, "leaving", wait=False))
        staying = started.add(Agent(r1, backend, "staying"))
        async with asyncio.timeout(TEST_TIMEOUT):
            assert await asyncio.to_thread(opened_on, [r1, r2], leaving.instance) is r2
            assert await _holders(redis_server, "leaving") == ["r2"]
            # In flight when r2 is told to stop: r1 -> r2 -> agent, and r2 -> r1 -> agent.
            through_r2 = await reaching_backend(
                backend,
                caller.stub(r1).Unary(
                    test_pb2.Message(payload=b"kept", delay_millis=1500),
                    metadata={"tunnel-key": "leaving", "x-call-id": "via-r2"},
                ),
                "via-r2",
            )
            from_r2 = await reaching_backend(
                backend,
                caller.stub(r2).Unary(
                    test_pb2.Message(payload=b"kept too", delay_millis=1500),
                    metadata={"tunnel-key": "staying", "x-call-id": "from-r2"},
                ),
                "from-r2",
            )
            mark = leaving.mark()
            r2.signal(signal.SIGTERM)
            await r2.event("registry_withdrawn")
            # Gone from the registry at once, while its calls still run.
            assert await _holders(redis_server, "leaving") == []
            assert not through_r2.done() and not from_r2.done()
            # New calls for its key wait for the agent to come back elsewhere.
            waiting = asyncio.create_task(
                caller.stub(r1).Unary(
                    test_pb2.Message(payload=b"next"), metadata={"tunnel-key": "leaving"}
                )
            )
            assert (await through_r2).payload == b"kept"
            assert (await from_r2).payload == b"kept too"
            assert await r2.exited() == 0
            await asyncio.to_thread(leaving.wait_connected, after=mark)
            assert (await waiting).payload == b"next"
            assert await _holders(redis_server, "leaving") == ["r1"]
            assert staying.process.poll() is None


async def test_redis_killed_and_restarted(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    with processes() as started:
        r1 = started.add(Replica(redis_server, "r1", secret))
        r2 = started.add(Replica(redis_server, "r2", secret))
        started.add(Agent(r1, backend, "here"))
        started.add(Agent(r2, backend, "there"))
        stub = caller.stub(r1)
        async with asyncio.timeout(TEST_TIMEOUT):
            assert (
                await stub.Unary(test_pb2.Message(), metadata={"tunnel-key": "there"})
            ) is not None

            # Local calls go on the whole time, whatever Redis does.
            local_failures: list[BaseException] = []
            local_calls = 0
            stop_local = asyncio.Event()

            async def call_local() -> None:
                nonlocal local_calls
                while not stop_local.is_set():
                    try:
                        await stub.Unary(
                            test_pb2.Message(), metadata={"tunnel-key": "here"}, timeout=5
                        )
                        local_calls += 1
                    except GRPCError as exc:
                        local_failures.append(exc)
                    await asyncio.sleep(0.01)  # pacing, not synchronisation

            local = asyncio.create_task(call_local())
            try:
                redis_server.stop()
                await r1.event("registry_unreachable")
                with pytest.raises(GRPCError) as failure:
                    await stub.Unary(test_pb2.Message(), metadata={"tunnel-key": "there"})
                assert failure.value.status is Status.UNAVAILABLE
                assert f"registry redis://127.0.0.1:{redis_server.port}/0" in (
                    failure.value.message or ""
                )
                # A local call while Redis is down.
                reply = await stub.Unary(
                    test_pb2.Message(payload=b"x"), metadata={"tunnel-key": "here"}
                )
                assert reply.payload == b"x"
                status, body = await get(r1.admin, "/readyz")
                assert status == 200 and "registry down" in body
                assert (await metrics(r1.admin))[("grpctunnel_router_registry_up", ())] == 0

                restarted_server = RedisServer(port=redis_server.port)
                started_again = time.monotonic()
                try:
                    when, _ = await _first_success(stub, "there", REFRESH + 10)
                    recovery = when - started_again
                    # Restarted empty: both routers have written their keys again.
                    assert await _holders(restarted_server, "here") == ["r1"]
                    assert await _holders(restarted_server, "there") == ["r2"]
                    refilled = time.monotonic() - started_again
                finally:
                    restarted_server.stop()
            finally:
                stop_local.set()
                await local
            print(
                f"\nredis restart: remote calls back after {recovery:.3f} s, "
                f"registry refilled within {refilled:.3f} s (one refresh: {REFRESH:.3f} s); "
                f"{local_calls} local calls, {len(local_failures)} failed"
            )
            assert local_failures == []
            assert local_calls > 0
            assert recovery < REFRESH + SLACK
