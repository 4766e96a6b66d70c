"""The life of one tunnel, the same for both roles.

A tunnel is a sans-IO protocol object (``_core``), a ``Driver`` that moves
its frames, and the gRPC call that carries them (the *carrier*).  This module
owns their life; ``_client_tunnel`` and ``_server_tunnel`` add what each role
does with streams.

Tasks.  One *main* coroutine (``_run``) owns every task of the tunnel: the
frame reader, the frame writer and the keepalive.  It waits until the first
of them ends (or a stop is asked for), and then ends the tunnel as a whole:
whichever part fails -- the reader, the writer, the carrier under them, the
keepalive -- the outcome is the same, every call ends with a status and
whoever waits for the tunnel is released.  Nothing is left running: the main
coroutine cancels and awaits every task it started, even when it is itself
cancelled while doing so.

Phases.  ``OPENING`` (a tunnel client waiting for the server's ``Settings``)
-> ``OPEN`` -> ``ENDING`` -> ``CLOSED``.  The switch to ``ENDING`` happens in
one synchronous step (``_begin_ending``) that records why the tunnel ends and
ends every stream at once; new streams are accepted only while ``OPEN``, so
there is no moment at which a call can start on a tunnel that is ending and
then be forgotten.

Why it ended.  ``error`` is None while the tunnel is open and after a close
asked for by its owner (``close()``/``stop()``); in every other case it says
why: the peer broke the protocol, the connection was lost, the peer stopped
answering keepalive checks, or the peer ended the tunnel.  Calls in flight
fail with CANCELLED only after the owner's close; in every other case with
UNAVAILABLE and a message that names the cause.

Keepalive.  When the peer has been silent for ``keepalive_interval``
seconds, the tunnel checks that it is still there (``_probe``: a tunneled
call that any conforming peer answers, or a probe of the connection) and
gives it ``keepalive_timeout`` seconds to answer.  See docs/keepalive.md.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Generic, Protocol, TypeVar

from google.protobuf.message import Message
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.protocol import Peer

from ._carrier import BatchSender
from ._core.connection import Connection
from ._core.events import Event
from ._driver import Driver
from ._stats import TunnelStatistics
from ._tasks import Flag, cancel_and_wait
from .errors import KeepaliveTimeoutError, RemoteProtocolError, TunnelClosedError, TunnelError
from .options import TunnelOptions

__all__ = [
    "Carrier",
    "EndReason",
    "Ending",
    "Phase",
    "Tunnel",
    "as_status",
    "closed_message",
    "describe",
    "reason_for",
]

log = logging.getLogger("tunnel")

InFrame = TypeVar("InFrame", bound=Message)
OutFrame = TypeVar("OutFrame", bound=Message)
_In_co = TypeVar("_In_co", bound=Message, covariant=True)
_Out_contra = TypeVar("_Out_contra", bound=Message, contravariant=True)


class Carrier(Protocol[_In_co, _Out_contra]):
    """The carrying gRPC call, as a tunnel sees it (either role)."""

    #: The peer of the connection under the call, if there is one.
    peer: Peer | None
    #: Writes many frames in one go, when the call allows it (``_carrier``).
    send_batch: BatchSender | None
    #: False where our side cannot half-close the call (a network server
    #: ends a call it serves by returning, not by half-closing).
    can_half_close: bool

    async def send(self, frame: _Out_contra) -> None: ...

    async def recv(self) -> _In_co | None:
        """The next frame, or None once the peer ended its side."""
        ...

    async def end(self) -> None:
        """Close our side of the call (no more frames from us)."""

    async def finish(self) -> None:
        """The peer ended its side: collect the call's final status.

        Raises the call's error (a ``GRPCError``) if it failed.
        """

    async def aclose(self) -> None:
        """Release the call, cutting it off if it is still open."""

    def abort_connection(self) -> None:
        """Cut the connection under the call at once (a dead peer's)."""

    def connection_lost(self) -> bool:
        """True if the connection under the call is gone."""
        ...


class Phase(enum.Enum):
    OPENING = "opening"
    OPEN = "open"
    ENDING = "ending"
    CLOSED = "closed"


class EndReason(enum.Enum):
    """Why a tunnel ended, for programs that count or log it (``end_reason``)."""

    #: Its owner closed it (``close()``, ``stop()``), or opening was abandoned.
    CLOSED = "closed"
    #: The peer ended it in order.
    PEER_CLOSED = "peer_closed"
    #: The peer ended its carrying call with an error status.
    PEER_STATUS = "peer_status"
    #: The connection under it was lost, or its carrying call failed.
    CONNECTION_LOST = "connection_lost"
    #: The peer stopped answering keepalive checks.
    KEEPALIVE = "keepalive"
    #: The peer broke the protocol.
    PROTOCOL_ERROR = "protocol_error"
    #: The process serving its carrying call is stopping.
    STOPPING = "stopping"


@dataclass(frozen=True, slots=True)
class Ending:
    """Why a tunnel ends, and how its streams end with it."""

    #: The status calls in flight end with (tunnel client role).
    status: Status
    #: Their message, which names the cause.
    message: str
    #: What ``error`` becomes; None for a close asked for by the owner.
    error: BaseException | None
    #: Let queued frames out and end the carrying call in order, rather than
    #: cutting it off.
    graceful: bool
    #: The same, as a value to count by.
    reason: EndReason = EndReason.CLOSED


def reason_for(error: BaseException) -> EndReason:
    """The ``EndReason`` of a tunnel that ended because of *error*."""
    if isinstance(error, KeepaliveTimeoutError):
        return EndReason.KEEPALIVE
    if isinstance(error, RemoteProtocolError):
        return EndReason.PROTOCOL_ERROR
    if isinstance(error, GRPCError):
        return EndReason.PEER_STATUS
    return EndReason.CONNECTION_LOST


def describe(exc: BaseException) -> str:
    """A short cause for a message, without wrapping it again.

    A ``GRPCError`` gives its own message: a tunnel nested in another keeps
    the innermost cause as it is instead of growing a prefix per level.
    """
    if isinstance(exc, GRPCError):
        return exc.message or exc.status.name
    return str(exc) or type(exc).__name__


def as_status(error: BaseException) -> GRPCError:
    """The status that ends a carrying call because of *error*.

    A peer that broke the protocol gets "tunnel protocol error: ..." with
    the error's status (INTERNAL; RESOURCE_EXHAUSTED for a frame over the
    bound); a status stays itself; anything else (a lost connection, a peer
    that stopped answering) is UNAVAILABLE naming the cause.
    """
    if isinstance(error, GRPCError):
        return error
    if isinstance(error, RemoteProtocolError):
        return error.grpc_error()
    return GRPCError(Status.UNAVAILABLE, closed_message(describe(error)))


def _as_tunnel_error(exc: BaseException) -> BaseException:
    """What ``error`` says for *exc*: the connection's own failures become
    ``TunnelClosedError`` (caused by them), whichever role and carrier saw
    them; a status or a ``TunnelError`` stays what it is."""
    if isinstance(exc, GRPCError | TunnelError):
        return exc
    closed = TunnelClosedError(describe(exc))
    closed.__cause__ = exc
    return closed


def closed_message(cause: str) -> str:
    """``tunnel closed: <cause>``, unless the cause already says so."""
    return cause if cause.startswith("tunnel closed") else f"tunnel closed: {cause}"


class Tunnel(Generic[InFrame, OutFrame]):
    """Reader, writer and keepalive of one tunnel, and its one life cycle."""

    #: Set by each role: what ``_run`` ends streams with when the owner stops.
    _role = "tunnel"

    def __init__(
        self,
        core: Connection[OutFrame],
        receive: Callable[[InFrame], list[Event]],
        carrier: Carrier[InFrame, OutFrame],
        options: TunnelOptions,
    ) -> None:
        self.options = options
        self.carrier = carrier
        self.driver: Driver[InFrame, OutFrame] = Driver(
            core, receive, carrier.send, carrier.recv, carrier.send_batch
        )
        self.phase = Phase.OPEN
        #: Why the tunnel ended; None while open and after the owner's close.
        self.error: BaseException | None = None
        #: Round-trip time of the last keepalive check, in seconds.
        self.keepalive_rtt: float | None = None
        #: How many keepalive checks the peer answered.
        self.keepalive_answered = 0
        self._ending: Ending | None = None
        #: What the main task waits on: resolved when an owner asks the
        #: tunnel to stop (``_request_stop``) or one of its tasks ends.
        self._stop: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._closed = Flag()
        self._alive_at = 0.0
        self._started_at = asyncio.get_running_loop().time()

    # -- the owner's side --------------------------------------------------------

    def statistics(self) -> TunnelStatistics:
        """A snapshot of what the tunnel carried so far (``TunnelStatistics``)."""
        driver = self.driver
        core = driver.core
        counters = core.counters
        now = asyncio.get_running_loop().time()
        return TunnelStatistics(
            streams_opened=counters.streams_opened,
            streams_active=core.streams_in_use,
            streams_failed=counters.streams_failed,
            messages_sent=counters.messages_sent,
            messages_received=counters.messages_received,
            bytes_sent=counters.bytes_sent,
            bytes_received=counters.bytes_received,
            send_wait_seconds=driver.send_wait,
            age_seconds=now - self._started_at,
            idle_seconds=now - max(driver.last_received, driver.last_sent),
            keepalive_rtt_seconds=self.keepalive_rtt,
        )

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def end_reason(self) -> EndReason | None:
        """Why the tunnel ended (or is ending); None while it is open."""
        return None if self._ending is None else self._ending.reason

    async def wait_closed(self) -> None:
        await self._closed.wait()

    def _request_stop(self, ending: Ending) -> None:
        """End the tunnel from outside its tasks (close, stop, abort)."""
        self._begin_ending(ending)
        if not self._stop.done():
            self._stop.set_result(None)

    # -- what each role supplies ---------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        raise NotImplementedError

    def _end_streams(self, ending: Ending) -> None:
        """End every stream at once (synchronously): calls fail, handlers stop."""
        raise NotImplementedError

    async def _wind_down(self, ending: Ending, reader: asyncio.Task[None]) -> None:
        """A graceful end: let final frames out, end the carrying call in order."""

    async def _after(self, ending: Ending) -> None:
        """Cleanup once the reader and writer are gone (always runs)."""

    async def _peer_ended(self) -> Ending:
        """The ending when the peer ended its side of the carrying call."""
        raise NotImplementedError

    def _owner_cancelled(self) -> Ending:
        """The ending when the task running ``_run`` is cancelled from outside."""
        lost = self.carrier.connection_lost()
        cause = "connection lost" if lost else f"the {self._role} stopped"
        reason = EndReason.CONNECTION_LOST if lost else EndReason.STOPPING
        error = TunnelClosedError(cause)
        return Ending(Status.UNAVAILABLE, closed_message(cause), error, False, reason)

    def _can_probe(self) -> bool:
        """True if this end can check that its peer is alive."""
        return False

    async def _probe(self) -> None:
        """Return once the peer answered a check that it is alive."""
        raise NotImplementedError

    async def _ready_for_probes(self) -> None:
        """Wait until probes may be sent."""

    # -- the life cycle ------------------------------------------------------------

    def _begin_ending(self, ending: Ending) -> None:
        """Switch to ENDING (once; the first reason wins) and end every stream."""
        if self._ending is not None:
            return
        self._ending = ending
        self.phase = Phase.ENDING
        self.error = ending.error
        self._end_streams(ending)

    async def _run(self) -> None:
        """Run the tunnel until it ends (see the module docstring)."""
        driver = self.driver
        reader = asyncio.create_task(
            driver.read_loop(self._on_events, self._on_fatal), name=f"{self._role}-reader"
        )
        writer = asyncio.create_task(driver.write_loop(), name=f"{self._role}-writer")
        tasks: list[asyncio.Future[None]] = [reader, writer]
        keepalive = None
        if self.options.keepalive_interval is not None and self._can_probe():
            keepalive = asyncio.create_task(self._keepalive(), name=f"{self._role}-keepalive")
            tasks.append(keepalive)
        for task in tasks:
            task.add_done_callback(self._task_ended)
        tasks.append(self._stop)
        interrupted = False
        try:
            # What asyncio.wait(FIRST_COMPLETED) would do, without the
            # kilobyte and a half it keeps per waiting tunnel end.
            await self._stop
        except asyncio.CancelledError:
            interrupted = True
        if self._ending is None:  # else a stop was asked for, and said why
            if interrupted:
                self._begin_ending(self._owner_cancelled())
            else:
                why = self._why(reader, writer, keepalive)
                if why is None:
                    # The peer ended its side in order: no call starts while
                    # we learn how (the carrying call's status, say).
                    self.phase = Phase.ENDING
                    try:
                        why = await self._peer_ended()
                    except asyncio.CancelledError:
                        interrupted = True
                        why = self._owner_cancelled()
                self._begin_ending(why)
        ending = self._ending
        assert ending is not None
        try:
            if ending.graceful and not interrupted:
                await self._wind_down(ending, reader)
        except asyncio.CancelledError:
            interrupted = True
        except Exception:
            # The end is under way whatever happens here; say why, quietly.
            log.debug("%s: error while ending", self._role, exc_info=True)
        finally:
            try:
                await cancel_and_wait(tasks)
            except asyncio.CancelledError:
                interrupted = True
            if isinstance(ending.error, KeepaliveTimeoutError):
                self.carrier.abort_connection()
            try:
                await self._after(ending)
            except asyncio.CancelledError:
                interrupted = True
            self.phase = Phase.CLOSED
            self._closed.set()
        if interrupted:
            raise asyncio.CancelledError

    def _task_ended(self, task: asyncio.Future[None]) -> None:
        if not self._stop.done():
            self._stop.set_result(None)

    def _on_fatal(self, exc: Exception) -> None:
        """The peer broke the protocol: the tunnel ends now, in this very step."""
        error = _as_tunnel_error(exc)
        message = closed_message(describe(exc))
        self._begin_ending(Ending(Status.UNAVAILABLE, message, error, False, reason_for(error)))

    def _why(
        self,
        reader: asyncio.Task[None],
        writer: asyncio.Task[None],
        keepalive: asyncio.Task[None] | None,
    ) -> Ending | None:
        """The ending, from the first task that ended; None: the peer ended.

        Called only when no stop was asked for.
        """
        for task in (reader, writer, keepalive):
            if task is None or not task.done() or task.cancelled():
                continue
            exc = task.exception()
            if exc is not None:
                log.debug("%s ended: %s", self._role, describe(exc), exc_info=exc)
                error = _as_tunnel_error(exc)
                message = closed_message(describe(exc))
                return Ending(Status.UNAVAILABLE, message, error, False, reason_for(error))
            if task is reader:
                return None
        # The writer and the keepalive run until cancelled or failed.
        raise AssertionError("tunnel task ended without a cause")

    # -- keepalive -----------------------------------------------------------------

    async def _keepalive(self) -> None:
        """Check the peer after each ``keepalive_interval`` of its silence."""
        interval = self.options.keepalive_interval
        timeout = self.options.keepalive_timeout
        assert interval is not None
        await self._ready_for_probes()
        loop = asyncio.get_running_loop()
        self._alive_at = loop.time()
        while True:
            heard = max(self.driver.last_received, self._alive_at)
            silent = loop.time() - heard
            if silent < interval:
                await asyncio.sleep(interval - silent)
                continue
            started = loop.time()
            try:
                async with asyncio.timeout(timeout):
                    await self._probe()
            except TimeoutError:
                raise KeepaliveTimeoutError(
                    f"the peer did not answer a keepalive check within {timeout:g} s"
                ) from None
            self._alive_at = loop.time()
            self.keepalive_rtt = self._alive_at - started
            self.keepalive_answered += 1
