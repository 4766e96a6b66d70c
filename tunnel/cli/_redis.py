"""The registry's store in Redis: every Redis command the router sends is here.

What is stored, for each key ``K`` (``{K}`` is a Redis Cluster hash tag:
every entry of one key lives in one slot, so each script below touches a
single slot and runs on a cluster as on one server):

* ``grpctunnel:{K}:routers``: a sorted set of the routers holding ``K``;
  each member is a router's id and peer address (JSON), its score the
  moment (ms, Redis's clock) the entry expires.  Lookups read only the
  members not yet expired, so a crashed router's entry stops counting
  after the TTL even before Redis drops it; the set itself expires once
  no router refreshes it.
* ``grpctunnel:{K}:latest``: ``GEN INSTANCE``, the newest registration
  of ``K`` (``GEN`` is Redis's clock in microseconds when it happened).
  Under ``--on-duplicate replace`` the older tunnels give way to it.
* ``grpctunnel:{K}:claim``: the agent instance that holds ``K`` under
  ``--on-duplicate reject``, taken atomically (compare and set).

Besides, for ``/tunnels`` only: ``grpctunnel:routers`` (the live routers,
a sorted set as above) and ``grpctunnel:router:{ID}:keys`` (the keys
router ``ID`` holds).  Every registration is announced on the pub/sub
channel ``grpctunnel:registrations`` (JSON: key, router, instance, gen),
which wakes calls waiting for the key on every router.

Times come from Redis (``TIME`` inside the scripts), not from the routers'
clocks, which need not agree.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import redis.asyncio
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from ._registry import Holder, Holding, Refreshed, Registration, RegistryError
from ._settings import describe_url

__all__ = ["RedisStore"]

PREFIX = "grpctunnel"
CHANNEL = f"{PREFIX}:registrations"
ROUTERS = f"{PREFIX}:routers"
#: Keys refreshed per round trip (a pipeline of scripts).
BATCH = 500
#: Seconds a command may take before the registry counts as unreachable.
COMMAND_TIMEOUT = 2.0
#: Seconds one read of the pub/sub connection waits for a message.
LISTEN_WAIT = 1.0

_FAILURES = (redis.exceptions.RedisError, OSError, TimeoutError)


def _tag(text: str) -> str:
    """``text`` as a hash tag: braces escaped, so the tag is all of it."""
    return text.replace("%", "%25").replace("{", "%7B").replace("}", "%7D")


def _keys(key: str) -> list[str]:
    tag = f"{PREFIX}:{{{_tag(key)}}}"
    return [f"{tag}:routers", f"{tag}:latest", f"{tag}:claim"]


def _router_keys(router: str) -> str:
    return f"{PREFIX}:router:{{{_tag(router)}}}:keys"


# The scripts share one layout.  KEYS: routers, latest, claim (of one key).
# ARGV: [1] the router's member, [2] ttl ms, [3] agent instance, [4] claim
# (0/1: ``reject``), [5] gen (refresh only), [6] router id, [7] the key.

# Redis's clock, in ms (number) and in µs (string: a Lua number prints
# with 14 digits only).
_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local gen = t[1] .. string.format('%06d', tonumber(t[2]))
"""
_TTL = "local ttl = tonumber(ARGV[2])\n"

# ``claimed``: false if another instance has the claim; else it is (re)taken.
_TAKE_CLAIM = """
local claimed = true
if ARGV[4] == '1' then
  local owner = redis.call('GET', KEYS[3])
  if owner and owner ~= ARGV[3] then
    claimed = false
  else
    redis.call('SET', KEYS[3], ARGV[3], 'PX', ttl)
  end
end
"""

# The router's entry in the sorted set KEYS[1], expiring ttl ms from now
# (expired members dropped, the set kept as long); ``new``: it was not there.
_ENTRY = """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local new = redis.call('ZADD', KEYS[1], now + ttl, ARGV[1])
if redis.call('PTTL', KEYS[1]) < ttl then redis.call('PEXPIRE', KEYS[1], ttl) end
"""


def _announce(gen: str) -> str:
    return (
        f"redis.call('PUBLISH', '{CHANNEL}', cjson.encode("
        f"{{key = ARGV[7], router = ARGV[6], instance = ARGV[3], gen = {gen}}}))\n"
    )


# Records the entry and the newest registration, and announces it.  Returns
# the registration's gen, or 0 if the claim is another instance's (nothing
# is recorded then).
_HOLD = (
    _NOW
    + _TTL
    + _TAKE_CLAIM
    + """
if not claimed then return 0 end
"""
    + _ENTRY
    + """
redis.call('SET', KEYS[2], gen .. ' ' .. ARGV[3], 'PX', ttl)
"""
    + _announce("gen")
    + "return gen\n"
)

# Keeps an entry alive, and puts it back (announced anew, with its first
# gen) if Redis lost it; under ``reject`` only while the claim is still the
# instance's.  Returns {claim still ours (0/1), the newest registration
# "GEN INSTANCE"}.
_REFRESH = (
    _NOW
    + _TTL
    + _TAKE_CLAIM
    + """
if not claimed then return {0, redis.call('GET', KEYS[2]) or ''} end
"""
    + _ENTRY
    + """
local latest = redis.call('GET', KEYS[2])
local newest = latest and tonumber(string.match(latest, '^(%d+)')) or -1
if newest < tonumber(ARGV[5]) then
  latest = ARGV[5] .. ' ' .. ARGV[3]
  redis.call('SET', KEYS[2], latest, 'PX', ttl)
elseif redis.call('PTTL', KEYS[2]) < ttl then
  redis.call('PEXPIRE', KEYS[2], ttl)
end
if new == 1 then
"""
    + _announce("ARGV[5]")
    + """end
return {1, latest}
"""
)

# 1 if the claim is (now) the instance's.
_CLAIM = _TTL + _TAKE_CLAIM + "if claimed then return 1 else return 0 end\n"

# KEYS: a sorted set of expiring members.  ARGV: member, ttl ms.
_ALIVE = _NOW + _TTL + _ENTRY + "return 1\n"

# KEYS: routers, claim.  ARGV: member, instance, last (0/1).  Drops the
# instance's claim, and with ``last`` the router's entry.
_RELEASE = """
if ARGV[3] == '1' then redis.call('ZREM', KEYS[1], ARGV[1]) end
if redis.call('GET', KEYS[2]) == ARGV[2] then redis.call('DEL', KEYS[2]) end
return 1
"""

# KEYS: a sorted set of expiring members.  ARGV: member, ttl ms.
_ALIVE = (
    _NOW
    + """
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
return 1
"""
)

# KEYS: a sorted set of expiring members.  The members not expired.
_LOOKUP = (
    _NOW
    + """
return redis.call('ZRANGEBYSCORE', KEYS[1], now, '+inf')
"""
)


class RedisStore:
    """The registry's store (``_registry.Store``) on one Redis server.

    ``client`` must decode responses (``decode_responses=True``).  Every
    failure to reach Redis, or a command that takes longer than
    ``COMMAND_TIMEOUT``, is a ``RegistryError`` that names the server; the
    registry then counts as down and reconnects (``_registry.Registry``).
    redis-py's own retries are off: the registry decides when to retry.
    """

    def __init__(self, client: redis.asyncio.Redis, description: str) -> None:
        self.description = description
        self._redis = client
        self._hold = self._redis.register_script(_HOLD)
        self._refresh = self._redis.register_script(_REFRESH)
        self._claim = self._redis.register_script(_CLAIM)
        self._release = self._redis.register_script(_RELEASE)
        self._lookup = self._redis.register_script(_LOOKUP)
        self._alive = self._redis.register_script(_ALIVE)

    @classmethod
    def from_url(cls, url: str, *, password: str | None = None) -> RedisStore:
        client = redis.asyncio.Redis.from_url(
            url,
            password=password,
            socket_timeout=COMMAND_TIMEOUT,
            socket_connect_timeout=COMMAND_TIMEOUT,
            retry=Retry(NoBackoff(), 0),
            decode_responses=True,
        )
        return cls(client, describe_url(url))

    def _error(self, exc: BaseException) -> RegistryError:
        return RegistryError(f"the registry {self.description} is unreachable: {exc}")

    async def _run(self, operation: Awaitable[Any]) -> Any:
        try:
            return await operation
        except _FAILURES as exc:
            raise self._error(exc) from None

    async def ping(self) -> None:
        await self._run(self._redis.ping())

    async def hold(
        self, key: str, holder: Holder, instance: str, ttl: float, *, claim: bool
    ) -> int | None:
        gen = await self._run(
            self._hold(
                keys=_keys(key),
                args=[holder.member(), _ms(ttl), instance, int(claim), "", holder.router, key],
            )
        )
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.sadd(_router_keys(holder.router), key)
            pipe.pexpire(_router_keys(holder.router), _ms(ttl))
            await self._run(pipe.execute())
        return int(gen) or None

    async def claim(self, key: str, instance: str, ttl: float) -> bool:
        claimed = await self._run(self._claim(keys=_keys(key), args=["", _ms(ttl), instance, 1]))
        return bool(claimed)

    async def refresh(
        self, holdings: Sequence[Holding], holder: Holder, ttl: float, *, claim: bool
    ) -> list[Refreshed]:
        results: list[Refreshed] = []
        member, ttl_ms = holder.member(), _ms(ttl)
        for start in range(0, len(holdings), BATCH):
            batch = holdings[start : start + BATCH]
            async with self._redis.pipeline(transaction=False) as pipe:
                for held in batch:
                    args = (member, ttl_ms, held.instance, int(claim), held.gen, holder.router)
                    await self._refresh(keys=_keys(held.key), args=[*args, held.key], client=pipe)
                replies = await self._run(pipe.execute())
            for held, (claimed, latest) in zip(batch, replies, strict=True):
                gen, _, instance = str(latest).partition(" ")
                newest = int(gen) if gen.isdigit() else 0
                results.append(Refreshed(held, bool(claimed), newest, instance))
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._alive(keys=[ROUTERS], args=[member, ttl_ms], client=pipe)
            pipe.pexpire(_router_keys(holder.router), ttl_ms)
            await self._run(pipe.execute())
        return results

    async def reindex(self, keys: Sequence[str], holder: Holder, ttl: float) -> None:
        """Write ``holder``'s list of keys anew (after Redis was unreachable or lost it)."""
        index = _router_keys(holder.router)
        async with self._redis.pipeline(transaction=True) as pipe:
            pipe.delete(index)
            for start in range(0, len(keys), BATCH):
                pipe.sadd(index, *keys[start : start + BATCH])
            pipe.pexpire(index, _ms(ttl))
            await self._run(pipe.execute())
        await self._run(self._alive(keys=[ROUTERS], args=[holder.member(), _ms(ttl)]))

    async def release(self, key: str, holder: Holder, instance: str, *, last: bool) -> None:
        async with self._redis.pipeline(transaction=False) as pipe:
            await self._release(
                keys=[_keys(key)[0], _keys(key)[2]],
                args=[holder.member(), instance, int(last)],
                client=pipe,
            )
            if last:
                pipe.srem(_router_keys(holder.router), key)
            await self._run(pipe.execute())

    async def withdraw(self, held: Sequence[Holding], holder: Holder) -> None:
        member = holder.member()
        for start in range(0, len(held), BATCH):
            async with self._redis.pipeline(transaction=False) as pipe:
                for item in held[start : start + BATCH]:
                    await self._release(
                        keys=[_keys(item.key)[0], _keys(item.key)[2]],
                        args=[member, item.instance, 1],
                        client=pipe,
                    )
                await self._run(pipe.execute())
        async with self._redis.pipeline(transaction=False) as pipe:
            pipe.delete(_router_keys(holder.router))
            pipe.zrem(ROUTERS, member)
            await self._run(pipe.execute())

    async def lookup(self, key: str) -> list[Holder]:
        members = await self._run(self._lookup(keys=[_keys(key)[0]]))
        return [h for m in members if (h := Holder.from_member(m)) is not None]

    async def holders(self) -> dict[Holder, list[str]]:
        """Every live router and the keys it holds (for /tunnels)."""
        members = await self._run(self._lookup(keys=[ROUTERS]))
        found: dict[Holder, list[str]] = {}
        for member in members:
            holder = Holder.from_member(member)
            if holder is not None:
                keys = await self._run(self._redis.smembers(_router_keys(holder.router)))
                found[holder] = sorted(keys)
        return found

    async def listen(self, on_registration: Callable[[Registration], None]) -> None:
        """Pass on every registration announced, until the connection fails (raises)."""
        pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._run(pubsub.subscribe(CHANNEL))
            while True:
                # A bounded wait per read: redis-py's reads time out after
                # COMMAND_TIMEOUT otherwise, on a channel that may be quiet.
                message = await self._run(pubsub.get_message(timeout=LISTEN_WAIT))
                if message is None or message.get("type") != "message":
                    continue
                notice = Registration.from_json(message["data"])
                if notice is not None:
                    on_registration(notice)
        finally:
            await pubsub.aclose()  # type: ignore[no-untyped-call]

    async def aclose(self) -> None:
        await self._redis.aclose()


def _ms(seconds: float) -> int:
    return max(1, round(seconds * 1000))
