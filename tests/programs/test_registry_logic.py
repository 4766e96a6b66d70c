"""The registry's bookkeeping (``tunnel.cli._registry``) and its Redis scripts, on fakeredis.

Unit tests beside the process tests: the scripts of ``_redis`` run in
fakeredis's Lua, several ``Registry`` objects (routers) share one fake
server, and the fake server's connection can be cut.  What the routers do
with it is tested against a real redis-server in test_replica*.py.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence

import fakeredis
import pytest
from redis.crc import key_slot

from tunnel.cli._redis import RedisStore, _keys, _router_keys
from tunnel.cli._registry import CLAIM_LOST, Holder, Registry, RegistryError

TTL = 0.3
LIMIT = 5.0


@pytest.fixture
def server() -> fakeredis.FakeServer:
    return fakeredis.FakeServer()


class Routers:
    """Registries ("routers") over one fake server; what each was told to retire."""

    def __init__(self, server: fakeredis.FakeServer) -> None:
        self.server = server
        self.made: list[Registry] = []
        self.superseded: dict[str, list[tuple[str, str, str]]] = {}

    def store(self) -> RedisStore:
        client = fakeredis.FakeAsyncRedis(server=self.server, decode_responses=True)
        return RedisStore(client, "redis://fake:6379/0")

    def add(self, name: str, policy: str = "allow", store: RedisStore | None = None) -> Registry:
        told = self.superseded.setdefault(name, [])
        registry = Registry(
            store or self.store(),
            Holder(name, f"{name}.example:7000"),
            ttl=TTL,
            policy=policy,
            on_superseded=lambda key, instance, why: told.append((key, instance, why)),
            min_backoff=0.01,
        )
        registry.start()
        self.made.append(registry)
        return registry


@pytest.fixture
async def routers(server: fakeredis.FakeServer) -> AsyncIterator[Routers]:
    made = Routers(server)
    try:
        yield made
    finally:
        for registry in made.made:
            await registry.aclose()


async def until(check: Callable[[], Awaitable[bool] | bool], what: str) -> None:
    """Wait (bounded) until ``check()`` holds; the registry works in its own tasks."""
    deadline = time.monotonic() + LIMIT
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"never: {what}")
        await asyncio.sleep(0.01)


async def holders_of(registry: Registry, key: str) -> Sequence[str]:
    return sorted(h.router for h in await registry.store.lookup(key))


def test_every_entry_of_a_key_is_in_one_cluster_slot() -> None:
    for key in ("kitchen", "a}b{c", "{x}", "}", "%7B", "caf\u00e9"):
        slots = {key_slot(name.encode()) for name in _keys(key)}
        assert len(slots) == 1, key
    # Escaping keeps distinct keys distinct.
    assert len({_keys(key)[0] for key in ("{x}", "x", "%7Bx%7D", "{x")}) == 4
    assert _router_keys("r1") != _router_keys("r2")


async def test_an_entry_is_refreshed_while_held_and_expires_once_not(routers: Routers) -> None:
    a, b = routers.add("a"), routers.add("b")
    await until(lambda: a.up and b.up, "connected")
    await a.add("kitchen", "i1")
    assert await b.lookup("kitchen") == [a.me]
    assert await a.lookup("kitchen") == []  # never itself
    # Three TTLs later it is still there: refreshed.
    await asyncio.sleep(3 * TTL)  # the time that passes is what is tested
    assert await b.lookup("kitchen") == [a.me]
    # A router that stops refreshing (a crash) drops out within the TTL.
    await a.aclose()
    gone_by = time.monotonic() + TTL
    await until(lambda: _empty(b, "kitchen"), "the entry expired")
    assert time.monotonic() < gone_by + 0.5


async def _empty(registry: Registry, key: str) -> bool:
    return await registry.lookup(key) == []


async def test_withdraw_and_release_remove_entries_at_once(routers: Routers) -> None:
    a, b = routers.add("a"), routers.add("b")
    await until(lambda: a.up and b.up, "connected")
    await a.add("k1", "i1")
    await a.add("k2", "i2")
    await a.add("k2", "i2")  # a second tunnel of the same agent
    assert (await b.remote_holders()) == {a.me: ["k1", "k2"]}
    await a.remove("k2", "i2")
    assert await b.lookup("k2") == [a.me]  # one tunnel left
    await a.remove("k2", "i2")
    assert await b.lookup("k2") == []
    await a.withdraw()
    assert await b.lookup("k1") == []
    assert await b.remote_holders() == {}


async def test_claims_are_per_agent_instance(routers: Routers) -> None:
    a, b = routers.add("a", "reject"), routers.add("b", "reject")
    await until(lambda: a.up and b.up, "connected")
    assert await a.claim("k", "i1") is True
    await a.add("k", "i1")
    assert await b.claim("k", "i2") is False
    assert await b.claim("k", "i1") is True  # the same agent, reconnecting elsewhere
    await a.remove("k", "i1")
    assert await b.claim("k", "i2") is True


async def test_replace_retires_the_older_instance_on_the_other_router(routers: Routers) -> None:
    a, b = routers.add("a", "replace"), routers.add("b", "replace")
    await until(lambda: a.up and b.up, "connected")
    await a.add("k", "older")
    await b.add("k", "newer")
    await until(lambda: bool(routers.superseded["a"]), "a told")
    assert routers.superseded["a"] == [("k", "older", "replaced by a newer tunnel on router b")]
    # The same agent on two routers is no duplicate.
    await a.add("k2", "same")
    await b.add("k2", "same")
    await asyncio.sleep(2 * a.interval)  # a refresh or two: still nothing to retire
    assert routers.superseded["b"] == []
    assert [told[0] for told in routers.superseded["a"]] == ["k"]


async def test_a_notice_during_our_own_registration_is_decided_by_the_registry_clock(
    routers: Routers,
) -> None:
    """a's registration is slow: b's notice arrives before a knows its own gen.

    a's script runs after b's, so a is the newer: b retires, a does not.
    """
    release = asyncio.Event()
    slow = routers.store()
    hold = slow.hold

    async def held_back(*args: object, **kwargs: object) -> int | None:
        await release.wait()
        return await hold(*args, **kwargs)  # type: ignore[arg-type]

    a = routers.add("a", "replace", store=slow)
    b = routers.add("b", "replace")
    await until(lambda: a.up and b.up, "connected")
    slow.hold = held_back  # type: ignore[method-assign]
    adding = asyncio.create_task(a.add("k", "one"))
    await asyncio.sleep(0)
    await b.add("k", "two")
    await asyncio.sleep(0.05)  # b's notice reaches a while a's own is held back
    release.set()
    await adding
    await until(lambda: bool(routers.superseded["b"]), "b told")
    assert routers.superseded["b"] == [("k", "two", "replaced by a newer tunnel on router a")]
    assert routers.superseded["a"] == []


async def test_a_refresh_makes_up_for_a_lost_notice(
    routers: Routers, server: fakeredis.FakeServer
) -> None:
    a = routers.add("a", "replace")
    await until(lambda: a.up, "connected")
    await a.add("k", "mine")
    (held,) = a.holds()
    # Another router registered "theirs" later, and its notice never came.
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    await client.set(_keys("k")[1], f"{held.gen + 1} theirs")
    await client.aclose()
    await until(lambda: bool(routers.superseded["a"]), "a told")
    assert routers.superseded["a"][0][:2] == ("k", "mine")


async def test_a_lost_claim_retires_the_tunnel_at_the_next_refresh(
    routers: Routers, server: fakeredis.FakeServer
) -> None:
    a = routers.add("a", "reject")
    await until(lambda: a.up, "connected")
    assert await a.claim("k", "mine") is True
    await a.add("k", "mine")
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    await client.set(_keys("k")[2], "theirs")  # e.g. Redis restarted and another claimed first
    await client.aclose()
    await until(lambda: bool(routers.superseded["a"]), "a told")
    assert routers.superseded["a"] == [("k", "mine", CLAIM_LOST.format(key="k"))]


async def test_down_fails_lookups_at_once_and_up_again_resyncs(
    routers: Routers, server: fakeredis.FakeServer
) -> None:
    a, b = routers.add("a"), routers.add("b")
    await until(lambda: a.up and b.up, "connected")
    await a.add("gone", "i1")
    server.connected = False
    with pytest.raises(RegistryError, match="redis://fake:6379/0"):
        await b.lookup("gone")
    await until(lambda: not a.up, "a noticed")
    started = time.monotonic()
    with pytest.raises(RegistryError, match="redis://fake:6379/0"):
        await a.lookup("gone")
    assert time.monotonic() - started < 0.1
    # What changes meanwhile is kept, and told to the store once it is back.
    await a.remove("gone", "i1")
    await a.add("new", "i2")
    server.connected = True
    await until(lambda: a.up and b.up, "reconnected")
    assert await b.lookup("new") == [a.me]
    assert await b.lookup("gone") == []


async def test_a_store_restarted_empty_is_refilled_within_one_refresh(
    routers: Routers, server: fakeredis.FakeServer
) -> None:
    a, b = routers.add("a"), routers.add("b")
    await until(lambda: a.up and b.up, "connected")
    await a.add("k", "i1")
    client = fakeredis.FakeAsyncRedis(server=server, decode_responses=True)
    await client.flushall()
    await client.aclose()
    emptied = time.monotonic()
    await until(lambda: _present(b, "k", a.me), "refilled")
    assert time.monotonic() - emptied < a.interval + 0.2


async def _present(registry: Registry, key: str, holder: Holder) -> bool:
    return await registry.lookup(key) == [holder]


async def test_watch_wakes_on_a_registration_anywhere(routers: Routers) -> None:
    a, b = routers.add("a"), routers.add("b")
    await until(lambda: a.up and b.up, "connected")
    with a.watch("k") as appeared, a.watch("other") as unrelated:
        await b.add("k", "i1")
        async with asyncio.timeout(LIMIT):
            await appeared.wait()
        assert not unrelated.is_set()
