"""``--on-duplicate`` across router replicas: the policy spans every router.

Two agents claim one key through two different routers.  Each agent has a
backend of its own, so a test can tell which one served a call.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

from tests.programs.cluster import RedisServer, Replica, printed_by, secret_file
from tests.programs.support import Agent, Backend, Callers, processes, tunnels
from tests.stubs.pb import test_pb2

TEST_TIMEOUT = 40.0
KEY = "twin"


async def _served_by(
    caller: Callers, router: Replica, backends: list[Backend], n: int
) -> list[int]:
    """Make ``n`` calls for KEY through ``router``: how many each backend served."""
    stub = caller.stub(router)
    counts = [0] * len(backends)
    for i in range(n):
        marks = [b.mark() for b in backends]
        call_id = f"dup-{i}"
        reply = await stub.Unary(
            test_pb2.Message(payload=b"%d" % i), metadata={"tunnel-key": KEY, "x-call-id": call_id}
        )
        assert reply.payload == b"%d" % i
        served = await asyncio.to_thread(
            printed_by,
            backends,
            lambda line, call_id=call_id: line.get("event") == "call" and line.get("id") == call_id,
            after=marks,
        )
        counts[backends.index(served)] += 1
    return counts


async def test_replace_closes_the_older_tunnel_on_the_other_router(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    with processes() as started:
        r1 = started.add(Replica(redis_server, "r1", secret, "--on-duplicate", "replace"))
        r2 = started.add(Replica(redis_server, "r2", secret, "--on-duplicate", "replace"))
        newer_backend = started.add(Backend())
        # The older agent stays away for a while once replaced (a long backoff).
        older = started.add(Agent(r1, backend, KEY, "--min-backoff", "20", "--max-backoff", "20"))
        async with asyncio.timeout(TEST_TIMEOUT):
            newer = started.add(Agent(r2, newer_backend, KEY))
            closed = await r1.event("tunnel_closed", key=KEY, instance=older.instance)
            assert closed["reason"] == "replaced by a newer tunnel on router r2"
            assert [t["key"] for t in await tunnels(r1.admin) if t["route"] == "local"] == []
            # Every call, whichever router it enters, goes to the newer agent.
            for router in (r1, r2):
                assert await _served_by(caller, router, [backend, newer_backend], 4) == [0, 4]
            assert newer.process.poll() is None


async def test_reject_refuses_the_newcomer_on_the_other_router(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    with processes() as started:
        r1 = started.add(Replica(redis_server, "r1", secret, "--on-duplicate", "reject"))
        r2 = started.add(Replica(redis_server, "r2", secret, "--on-duplicate", "reject"))
        first = started.add(Agent(r1, backend, KEY))
        async with asyncio.timeout(TEST_TIMEOUT):
            standby_backend = started.add(Backend())
            standby = started.add(Agent(r2, standby_backend, KEY, wait=False))
            refused = await r2.event("registration_refused", instance=standby.instance)
            assert refused["code"] == "ALREADY_EXISTS"
            assert "on another router" in refused["reason"]
            assert await _served_by(caller, r2, [backend, standby_backend], 3) == [3, 0]
            # The first agent goes: the standby (retrying with backoff) takes the key.
            first.stop()
            await r1.event("tunnel_closed", key=KEY, instance=first.instance)
            await r2.event("tunnel_opened", key=KEY, instance=standby.instance)
            assert await _served_by(caller, r1, [backend, standby_backend], 3) == [0, 3]


async def test_allow_spreads_calls_over_the_routers_that_hold_the_key(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    secret = secret_file(tmp_path)
    with processes() as started:
        r1, r2, r3 = (
            started.add(Replica(redis_server, f"r{i}", secret, "--on-duplicate", "allow"))
            for i in (1, 2, 3)
        )
        other_backend = started.add(Backend())
        started.add(Agent(r1, backend, KEY))
        started.add(Agent(r2, other_backend, KEY))
        async with asyncio.timeout(TEST_TIMEOUT):
            # r3 holds no tunnel for the key: its calls go to r1 or r2, at random.
            counts = await _served_by(caller, r3, [backend, other_backend], 40)
            assert sum(counts) == 40 and min(counts) > 0, counts
            # A router that holds the key serves its own calls.
            assert await _served_by(caller, r1, [backend, other_backend], 4) == [4, 0]
            remote = [t for t in await tunnels(r3.admin) if t["key"] == KEY]
            assert sorted(t["router"] for t in remote) == ["r1", "r2"]
