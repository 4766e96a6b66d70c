"""The routers' shared registry: which router holds which key.

Several ``grpctunnel router`` replicas behind one address share a store
(Redis, ``_redis.RedisStore``; anything with the ``Store`` methods will
do) in which each router records the keys it holds.  A router that gets a
call for a key it does not hold looks the key up and forwards the call to
a router that holds it (``_peers``).  This module is the bookkeeping
between the router and the store; it knows nothing of Redis's commands
nor of gRPC.

Theory of operation.

* Entries expire.  A router records each key with a TTL and refreshes all
  of them every third of it (``Store.refresh``); a router that dies stops
  refreshing, and its entries stop counting within the TTL.  A router that
  stops in order withdraws its entries at once (``withdraw``).
* The store may go away.  Every store operation that fails marks the
  registry *down*: lookups then fail at once with the store's error (the
  caller gets UNAVAILABLE naming the registry), while the router goes on
  serving the keys it holds.  One task (``_supervise``) reconnects with
  backoff (capped at the refresh interval) and, once the store answers,
  records again everything held now and forgets what was released
  meanwhile; a store that restarted empty is refilled the same way by the
  next refresh, which writes every entry as if new.
* Registrations are announced.  Each new entry is published
  (``Registration``) to every router: calls waiting for that key wake up
  (``watch``), and under ``--on-duplicate replace`` a router whose tunnel
  for the key came from another agent instance, registered earlier, retires
  it (``on_superseded``).  "Earlier" is the store's clock at registration
  (``gen``), so two routers registering at once agree on which one wins.
  A lost notice is made up for by the next refresh, which returns the
  newest registration of each key.
* ``reject`` is a claim: the first agent instance to claim a key holds it
  cluster-wide until its last tunnel goes (``claim``); a router whose
  claim was lost (the store restarted, another router claimed first)
  retires its tunnel at the next refresh.

Everything here runs on the router's event loop; the only task it owns is
the supervisor (and, while connected, its refresh and listen tasks).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, TypeVar

from ._logs import event

__all__ = [
    "Holder",
    "Holding",
    "Refreshed",
    "Registration",
    "Registry",
    "RegistryError",
    "Store",
]

log = logging.getLogger("grpctunnel.router")

T = TypeVar("T")

#: Why a tunnel gives way to another, as ``on_superseded``'s reason.
SUPERSEDED = "replaced by a newer tunnel on router {router}"
SUPERSEDED_ELSEWHERE = "replaced by a newer tunnel on another router"
CLAIM_LOST = "the registry gives key {key!r} to another agent"


class RegistryError(Exception):
    """The store could not be reached or failed; the message names it."""


@dataclass(frozen=True, slots=True)
class Holder:
    """A router as the registry knows it: its id and its peer address."""

    router: str
    address: str

    def member(self) -> str:
        return json.dumps([self.router, self.address], separators=(",", ":"))

    @classmethod
    def from_member(cls, member: str) -> Holder | None:
        try:
            router, address = json.loads(member)
        except (ValueError, TypeError):
            return None  # not written by us: ignore it
        if not isinstance(router, str) or not isinstance(address, str):
            return None
        return cls(router, address)


@dataclass(frozen=True, slots=True)
class Registration:
    """A notice: ``router`` registered ``key`` for agent ``instance`` at ``gen``."""

    key: str
    router: str
    instance: str
    gen: int

    @classmethod
    def from_json(cls, data: str | bytes) -> Registration | None:
        try:
            fields = json.loads(data)
            return cls(
                str(fields["key"]), str(fields["router"]), str(fields["instance"]),
                int(fields["gen"]),
            )  # fmt: skip
        except (ValueError, TypeError, KeyError):
            return None


@dataclass(slots=True)
class Holding:
    """A key this router holds, for one agent instance (it may have several tunnels)."""

    key: str
    instance: str
    tunnels: int = 1
    #: When the store recorded it (its clock, µs); 0 until then.
    gen: int = 0
    #: The router was told to retire it (told once; it goes when its tunnels close).
    superseded: bool = False


@dataclass(frozen=True, slots=True)
class Refreshed:
    """What a refresh learnt of one holding."""

    holding: Holding
    #: Under ``reject``: the holding's instance still has the claim.
    claimed: bool
    #: The key's newest registration, anywhere.
    latest_gen: int
    latest_instance: str


class Store(Protocol):
    """Where the entries live (``_redis.RedisStore``); every method may raise ``RegistryError``."""

    description: str

    async def ping(self) -> None: ...

    async def hold(
        self, key: str, holder: Holder, instance: str, ttl: float, *, claim: bool
    ) -> int | None:
        """Record and announce; the gen, or None if ``claim`` and another instance has it."""

    async def claim(self, key: str, instance: str, ttl: float) -> bool: ...

    async def refresh(
        self, holdings: Sequence[Holding], holder: Holder, ttl: float, *, claim: bool
    ) -> list[Refreshed]: ...

    async def reindex(self, keys: Sequence[str], holder: Holder, ttl: float) -> None: ...

    async def release(self, key: str, holder: Holder, instance: str, *, last: bool) -> None:
        """Drop ``instance``'s claim; with ``last``, ``holder``'s entry for ``key`` too."""

    async def withdraw(self, held: Sequence[Holding], holder: Holder) -> None: ...

    async def lookup(self, key: str) -> list[Holder]: ...

    async def holders(self) -> dict[Holder, list[str]]: ...

    async def listen(self, on_registration: Callable[[Registration], None]) -> None: ...

    async def aclose(self) -> None: ...


#: ``on_superseded(key, instance, reason)``: retire this router's tunnels of
#: ``key`` from agent ``instance``.
Superseded = Callable[[str, str, str], None]
#: ``observe(operation, seconds)``: how long one store operation took.
Observe = Callable[[str, float], None]


class Registry:
    """This router's entries in the store, kept up to date; lookups; notices."""

    def __init__(
        self,
        store: Store,
        me: Holder,
        *,
        ttl: float,
        policy: str,
        on_superseded: Superseded,
        observe: Observe | None = None,
        min_backoff: float = 0.05,
    ) -> None:
        self.store = store
        self.me = me
        self.ttl = ttl
        self.policy = policy
        self.interval = ttl / 3
        self._on_superseded = on_superseded
        self._observe = observe
        self._min_backoff = min(min_backoff, self.interval)
        self._held: dict[tuple[str, str], Holding] = {}
        #: (key, instance) released while the store was unreachable.
        self._unreleased: set[tuple[str, str]] = set()
        #: Newest registration seen of a key whose own registration is pending.
        self._seen: dict[str, Registration] = {}
        self._watchers: dict[str, set[asyncio.Event]] = {}
        self.up = False
        self.error: str = f"the registry {store.description} is not connected yet"
        self._trouble = asyncio.Event()
        self._withdrawn = False
        self._supervisor: asyncio.Task[None] | None = None

    # -- life cycle ----------------------------------------------------------------------

    def start(self) -> None:
        self._supervisor = asyncio.create_task(self._supervise(), name="registry")

    async def withdraw(self) -> None:
        """Stop refreshing and remove this router's entries now (graceful shutdown)."""
        self._withdrawn = True
        await self._stop_supervisor()
        if not self.up:
            return  # they expire within the TTL
        held = list(self._held.values())
        with contextlib.suppress(RegistryError):
            await self._timed("withdraw", self.store.withdraw(held, self.me))
            event(log, "registry_withdrawn", "registry entries withdrawn", keys=len(held))

    async def aclose(self) -> None:
        await self._stop_supervisor()
        await self.store.aclose()

    async def _stop_supervisor(self) -> None:
        task, self._supervisor = self._supervisor, None
        if task is not None:
            await _cancel([task])

    # -- what this router holds ----------------------------------------------------------

    def holds(self) -> list[Holding]:
        return list(self._held.values())

    async def add(self, key: str, instance: str) -> None:
        """A tunnel for ``key`` from agent ``instance`` registered here."""
        held = self._held.get((key, instance))
        if held is not None:
            held.tunnels += 1
            return
        held = self._held[key, instance] = Holding(key, instance)
        self._unreleased.discard((key, instance))
        if self.up and not self._withdrawn:
            with contextlib.suppress(RegistryError):
                await self._record(held)

    async def _record(self, held: Holding) -> None:
        gen = await self._timed(
            "hold",
            self.store.hold(
                held.key, self.me, held.instance, self.ttl, claim=self.policy == "reject"
            ),
        )
        if gen is None:
            self._supersede(held, CLAIM_LOST.format(key=held.key))
            return
        held.gen = gen
        seen = self._seen.pop(held.key, None)
        if seen is not None:
            self._apply(seen)

    async def remove(self, key: str, instance: str) -> None:
        """A tunnel for ``key`` from agent ``instance`` ended here."""
        held = self._held.get((key, instance))
        if held is None:
            return
        held.tunnels -= 1
        if held.tunnels > 0:
            return
        del self._held[key, instance]
        if self._withdrawn:
            return
        if not self.up:
            self._unreleased.add((key, instance))
            return
        with contextlib.suppress(RegistryError):
            await self._release(key, instance)

    async def _release(self, key: str, instance: str) -> None:
        # Another instance's tunnel may keep the key here (``allow``): then
        # only this instance's claim goes.
        last = not any(k == key for k, _ in self._held)
        await self._timed("release", self.store.release(key, self.me, instance, last=last))

    async def claim(self, key: str, instance: str) -> bool | None:
        """Under ``reject``: may ``instance`` register ``key``?  None if the store is down."""
        if not self.up:
            return None
        try:
            claimed: bool = await self._timed("claim", self.store.claim(key, instance, self.ttl))
        except RegistryError:
            return None
        return claimed

    # -- other routers -------------------------------------------------------------------

    async def lookup(self, key: str) -> list[Holder]:
        """The other routers that hold ``key``, in random order; ``RegistryError`` if down."""
        if not self.up:
            raise RegistryError(self.error)
        found: list[Holder] = await self._timed("lookup", self.store.lookup(key))
        others = [h for h in found if h.router != self.me.router]
        random.shuffle(others)
        return others

    async def remote_holders(self) -> dict[Holder, list[str]]:
        if not self.up:
            raise RegistryError(self.error)
        found: dict[Holder, list[str]] = await self._timed("holders", self.store.holders())
        return {h: keys for h, keys in found.items() if h.router != self.me.router}

    @contextlib.contextmanager
    def watch(self, key: str) -> Iterator[asyncio.Event]:
        """An event set whenever ``key`` is registered anywhere (clear it yourself)."""
        flag = asyncio.Event()
        watchers = self._watchers.setdefault(key, set())
        watchers.add(flag)
        try:
            yield flag
        finally:
            watchers.discard(flag)
            if not watchers:
                del self._watchers[key]

    # -- notices -------------------------------------------------------------------------

    def _notice(self, notice: Registration) -> None:
        for flag in self._watchers.get(notice.key, ()):
            flag.set()
        if notice.router != self.me.router:
            self._apply(notice)

    def _apply(self, notice: Registration) -> None:
        """Under ``replace``: retire what ``notice`` supersedes here."""
        if self.policy != "replace":
            return
        for held in [h for h in self._held.values() if h.key == notice.key]:
            if held.instance == notice.instance:
                continue
            if held.gen == 0:
                # Our own registration is on its way: decide when it is back.
                seen = self._seen.get(notice.key)
                if seen is None or seen.gen < notice.gen:
                    self._seen[notice.key] = notice
            elif held.gen < notice.gen:
                self._supersede(held, SUPERSEDED.format(router=notice.router))

    def _supersede(self, held: Holding, reason: str) -> None:
        if not held.superseded:
            held.superseded = True
            self._on_superseded(held.key, held.instance, reason)

    # -- the store, connected or not -----------------------------------------------------

    async def _timed(self, operation: str, step: Awaitable[T]) -> T:
        started = time.perf_counter()
        try:
            return await step
        except RegistryError as exc:
            self._down(str(exc))
            raise
        finally:
            if self._observe is not None:
                self._observe(operation, time.perf_counter() - started)

    def _down(self, error: str) -> None:
        self.error = error
        if self.up:
            self.up = False
            self._trouble.set()

    async def _supervise(self) -> None:
        delay = self._min_backoff
        while True:
            self._trouble.clear()
            try:
                await self._timed("ping", self.store.ping())
                await self._resync()
            except RegistryError as exc:
                event(
                    log,
                    "registry_unreachable",
                    "registry unreachable",
                    logging.WARNING,
                    registry=self.store.description,
                    error=str(exc),
                    retry_in_seconds=round(delay, 3),
                )
                await asyncio.sleep(delay * random.uniform(0.8, 1.2))
                delay = min(delay * 2, self.interval)
                continue
            delay = self._min_backoff
            self.up = True
            event(
                log,
                "registry_connected",
                "registry connected",
                registry=self.store.description,
                keys=len({k for k, _ in self._held}),
            )
            await self._connected()
            # Something failed: a moment before trying again, whatever it was.
            await asyncio.sleep(self._min_backoff)

    async def _connected(self) -> None:
        """Listen and refresh until something fails; then the supervisor reconnects."""
        tasks = [
            asyncio.create_task(self._listen(), name="registry listen"),
            asyncio.create_task(self._refresh_every_interval(), name="registry refresh"),
            asyncio.create_task(self._trouble.wait(), name="registry trouble"),
        ]
        try:
            done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        finally:
            await _cancel(tasks)
        for task in done:
            error = None if task.cancelled() else task.exception()
            if isinstance(error, RegistryError):
                self._down(str(error))
            elif error is not None:
                # Not the store's fault: a bug. Say so, and start over.
                log.error("registry task failed", exc_info=error)
                self._down(f"the registry {self.store.description} failed: {error!r}")
        self.up = False

    async def _listen(self) -> None:
        await self.store.listen(self._notice)

    async def _refresh_every_interval(self) -> None:
        while True:
            await asyncio.sleep(self.interval)
            await self._refresh()

    async def _refresh(self) -> None:
        held = list(self._held.values())
        results = await self._timed(
            "refresh",
            self.store.refresh(held, self.me, self.ttl, claim=self.policy == "reject"),
        )
        for result in results:
            holding = result.holding
            if self._held.get((holding.key, holding.instance)) is not holding:
                continue  # released meanwhile
            if self.policy == "reject" and not result.claimed:
                self._supersede(holding, CLAIM_LOST.format(key=holding.key))
            elif (
                self.policy == "replace"
                and result.latest_instance != holding.instance
                and result.latest_gen > holding.gen
            ):
                self._supersede(holding, SUPERSEDED_ELSEWHERE)

    async def _resync(self) -> None:
        """After (re)connecting: the store learns what changed while it was away."""
        for key, instance in list(self._unreleased):
            if (key, instance) not in self._held:
                await self._release(key, instance)
            self._unreleased.discard((key, instance))
        for held in [h for h in self._held.values() if h.gen == 0]:
            await self._record(held)
        await self._refresh()
        await self._timed(
            "reindex",
            self.store.reindex(sorted({k for k, _ in self._held}), self.me, self.ttl),
        )


async def _cancel(tasks: Sequence[asyncio.Task[Any]]) -> None:
    """Cancel ``tasks`` and wait until they are done, cancelling again if need be.

    A task waiting on the Redis client does not always end at the first
    cancel: with fakeredis on Python 3.11 the tests saw the cancellation
    swallowed now and then (the task went on to its next wait), and a
    router must not hang on shutdown for that.
    """
    interrupted = False
    while pending := [task for task in tasks if not task.done()]:
        for task in pending:
            task.cancel()
        try:
            await asyncio.wait(pending, timeout=0.1)
        except asyncio.CancelledError:
            interrupted = True  # ours too: finish theirs first, then stop
    for task in tasks:
        if not task.cancelled():
            task.exception()  # retrieved: the caller decides what it means
    if interrupted:
        raise asyncio.CancelledError
