"""The asyncio side of a tunnel client: calls, their events, the life cycle.

A ``ClientTunnel`` is the same object for a forward tunnel (we are the
network client) and a reverse one (we are the network server): only the
carrier differs.  Its life cycle is ``_tunnel.Tunnel``'s; what it adds:

* opening: ``start`` waits for the tunnel server's ``Settings``;
* a table of the calls in flight, each a ``TunnelClientStream`` fed with the
  core's events;
* how calls end with the tunnel: ``close()`` fails them with CANCELLED, sends
  ``cancel`` for each, closes our side of the carrying call and gives the
  peer ``close_timeout`` seconds to end its side before the call is cut off;
  any other end fails them with UNAVAILABLE and a message that names the
  cause;
* keepalive probes: a tunneled call to a method nobody serves
  (``KEEPALIVE_METHOD``), which every conforming tunnel server answers at
  once with ``close_stream``.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

from ._core.client import TunnelClientProtocol
from ._core.connection import KEEPALIVE_METHOD
from ._core.events import DataReceived, Event, HeadersReceived, Negotiated, StreamEnded
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._tasks import Flag
from ._tunnel import (
    Carrier,
    Ending,
    EndReason,
    Phase,
    Tunnel,
    closed_message,
    describe,
    reason_for,
)
from .errors import NegotiationError, OpenTimeoutError, TunnelClosedError
from .options import TunnelOptions

if TYPE_CHECKING:
    from ._client_stream import TunnelClientStream

__all__ = ["ClientTunnel"]

#: How calls in flight end when the owner closes the tunnel.
_CLOSED_BY_OWNER = Ending(Status.CANCELLED, "tunnel closed", None, graceful=True)


class ClientTunnel(Tunnel[ServerToClient, ClientToServer]):
    """Calls in flight over one tunnel, and the tasks that carry them."""

    _role = "tunnel client"

    def __init__(
        self,
        carrier: Carrier[ServerToClient, ClientToServer],
        options: TunnelOptions,
        *,
        peer_negotiates: bool,
        peer_max_streams: int | None = None,
    ) -> None:
        self.core = TunnelClientProtocol(
            peer_negotiates=peer_negotiates, **options._protocol_settings()
        )
        super().__init__(self.core, self.core.receive_frame, carrier, options)
        self.calls: dict[int, TunnelClientStream[object, object]] = {}
        #: Set by a handler's ``initiate_shutdown``: new calls are refused
        #: with UNAVAILABLE while running ones finish.
        self.draining = False
        self._probes: dict[int, asyncio.Future[None]] = {}
        #: The most streams the tunnel server said it serves at once; calls
        #: beyond it wait for room (``wait_for_room``) instead of being refused.
        self.peer_max_streams = peer_max_streams
        self._room = Flag()
        self._idle = Flag()
        self._idle.set()
        self._negotiated = Flag()
        if self.core.ready:
            self._negotiated.set()
        else:
            self.phase = Phase.OPENING
        self._main: asyncio.Task[None] | None = None

    # -- starting --------------------------------------------------------

    async def start(self, timeout: float) -> None:
        """Start the tasks and wait (up to *timeout* s) until calls may start.

        If the tunnel cannot be used (the server sent no ``Settings`` in
        time, broke negotiation, or ended the call), everything is torn
        down before this raises; so it is if the caller is cancelled.
        """
        self._main = asyncio.create_task(self._run(), name="tunnel-client")
        if self.core.ready:
            return
        ready = asyncio.create_task(self._negotiated.wait(), name="tunnel-client-negotiation")
        try:
            done, _ = await asyncio.wait(
                {ready, self._main}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED
            )
        except asyncio.CancelledError:
            self._abandon(TunnelClosedError("opening was cancelled"))
            await self._wait_main()
            raise
        finally:
            ready.cancel()
        if self.opened:
            return
        if not done:
            self._abandon_late(timeout)
        await self._wait_main()
        raise self.opening_error()

    async def _wait_main(self) -> None:
        assert self._main is not None
        await asyncio.wait([self._main])

    async def run(self) -> None:
        """Run the tunnel in the calling task until it ends (instead of ``start``).

        For an owner whose task lasts as long as the tunnel anyway (the
        network server's handler of a reverse tunnel): the tunnel has no
        main task of its own, which an idle tunnel would keep.  Whoever
        waits for it to open calls ``wait_opened`` from another task, and
        is cancelled by the owner if the tunnel ends first; once this
        returns without ``opened``, ``opening_error()`` says why.  Raises
        ``CancelledError`` if the calling task was cancelled (after ending
        the tunnel, as ``_owner_cancelled`` says).
        """
        self._main = asyncio.current_task()
        await self._run()

    async def wait_opened(self, timeout: float) -> bool:
        """Wait (up to *timeout* s) until calls may start on a tunnel ``run`` runs.

        Returns ``opened``.  A tunnel server that sends no ``Settings`` in
        time gets its tunnel abandoned (``OpenTimeoutError``).
        """
        try:
            async with asyncio.timeout(timeout):
                await self._negotiated.wait()
        except TimeoutError:
            self._abandon_late(timeout)
        return self.opened

    @property
    def opened(self) -> bool:
        """True once the server's ``Settings`` came and while calls may start."""
        return self._negotiated.is_set() and self.phase is Phase.OPEN

    def opening_error(self) -> BaseException:
        """Why a tunnel that ended without ever opening could not be used."""
        error = self.error
        if error is None or isinstance(error, TunnelClosedError):
            error = NegotiationError("tunnel server ended the call without sending settings")
            self.error = error
        return error

    def _abandon_late(self, timeout: float) -> None:
        self._abandon(
            OpenTimeoutError(f"tunnel server sent no settings within {timeout:.3g} seconds")
        )

    def _abandon(self, error: BaseException) -> None:
        """End a tunnel that never opened: cut its carrying call off at once."""
        message = closed_message(str(error))
        self._request_stop(Ending(Status.UNAVAILABLE, message, error, False, reason_for(error)))

    # -- the calls' side -------------------------------------------------

    def open_stream(
        self,
        call: TunnelClientStream[object, object],
        method: str,
        metadata: list[tuple[str, str | bytes]],
        cardinality: Cardinality,
        timeout: float | None,
    ) -> int:
        """Register a call and queue its ``new_stream``.

        Raises ``TunnelClosedError`` unless the tunnel is open and not
        draining: from the moment a tunnel starts to end, no call starts.
        """
        if self.phase is not Phase.OPEN:
            raise TunnelClosedError(self._refusal())
        if self.draining:
            raise TunnelClosedError("tunnel is shutting down")
        stream_id = self.core.open_stream(method, metadata, cardinality, timeout=timeout)
        self.calls[stream_id] = call
        self._idle.clear()
        self.driver.wake()
        return stream_id

    def _refusal(self) -> str:
        if self.phase is Phase.OPENING:
            return "tunnel is not open yet"
        if self._ending is not None and self._ending.error is not None:
            return self._ending.message
        return "tunnel closed"

    async def send_message(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        """Queue one request message (and the half-close with it, if *end*).

        Returns once the stream has no more than a window of data queued:
        the back-pressure of a tunneled ``send_message``.
        """
        self.queue_messages(stream_id, (data,), end=end)
        await self.driver.flushed(stream_id)

    def queue_messages(self, stream_id: int, messages: Iterable[bytes], *, end: bool) -> None:
        """Queue request messages at once, without waiting for them to leave."""
        core = self.core
        for data in messages:
            core.send_message(stream_id, data)
        if end:
            core.half_close(stream_id)
        self.driver.wake()

    def half_close(self, stream_id: int) -> None:
        """No more requests on this stream (a no-op once it is over)."""
        if self.core.is_open(stream_id):
            self.core.half_close(stream_id)
            self.driver.wake()

    def drop_call(self, stream_id: int) -> None:
        """Take a call out of the table (it is over, or went to another tunnel)."""
        self.calls.pop(stream_id, None)
        if not self.calls:
            self._idle.set()

    async def wait_idle(self) -> None:
        """Wait until no call is in flight on this tunnel."""
        await self._idle.wait()

    def full(self) -> bool:
        """True if a new stream would exceed the server's announced limit."""
        limit = self.peer_max_streams
        return limit is not None and self.core.active_streams >= limit

    async def wait_for_room(self) -> None:
        """Wait until a new stream fits under the server's limit, or the tunnel ends."""
        while self.full() and self.phase is Phase.OPEN:
            self._room.clear()
            await self._room.wait()

    def forget(self, stream_id: int) -> None:
        """A call is over: cancel its stream if it is still open."""
        self.drop_call(stream_id)
        if self.core.is_open(stream_id):
            self.core.cancel(stream_id)
            self.driver.wake()
            self._room.set()
        self.driver.release_waiters(stream_id)

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.driver.acknowledge(stream_id, n)

    @property
    def usable(self) -> bool:
        """True while new calls may start on this tunnel."""
        return self.phase is Phase.OPEN and not self.draining

    # -- events ------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        calls = self.calls
        for event in events:
            if isinstance(event, DataReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_data(event.data, event.end_of_message)
                else:
                    self._probe_answered(event.stream_id)
            elif isinstance(event, HeadersReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_headers(event.metadata)
                else:
                    self._probe_answered(event.stream_id)
            elif isinstance(event, StreamEnded):
                self.driver.release_waiters(event.stream_id)
                self._room.set()
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_end(event.status, event.trailers, abrupt=event.reset)
                else:
                    self._probe_answered(event.stream_id)
            elif isinstance(event, Negotiated):
                if self.phase is Phase.OPENING:
                    self.phase = Phase.OPEN
                self._negotiated.set()

    # -- keepalive -----------------------------------------------------------

    def _can_probe(self) -> bool:
        return True

    async def _ready_for_probes(self) -> None:
        await self._negotiated.wait()

    async def _probe(self) -> None:
        """A tunneled call to a method nobody serves; any answer will do.

        Under revision one nothing of it counts against a window, and the
        reference (and any conforming server) refuses an unknown method at
        once with ``close_stream``, which also counts as data from the
        network server for grpc-go's ping policing (see docs/keepalive.md).
        """
        core = self.core
        stream_id = core.open_stream(KEEPALIVE_METHOD, (), Cardinality.STREAM_STREAM)
        core.half_close(stream_id)
        answered = asyncio.get_running_loop().create_future()
        self._probes[stream_id] = answered
        self.driver.wake()
        try:
            await answered
        finally:
            del self._probes[stream_id]
            if core.is_open(stream_id):
                core.cancel(stream_id)
                self.driver.wake()

    def _probe_answered(self, stream_id: int) -> None:
        answered = self._probes.get(stream_id)
        if answered is not None and not answered.done():
            answered.set_result(None)

    # -- the life cycle ----------------------------------------------------

    def close(self) -> None:
        """Cancel every call and end the tunnel (see the module docstring)."""
        self._request_stop(_CLOSED_BY_OWNER)
        if self._main is None:
            self.phase = Phase.CLOSED
            self._closed.set()

    def _end_streams(self, ending: Ending) -> None:
        status = StatusProto(code=ending.status.value, message=ending.message)
        for stream_id, call in list(self.calls.items()):
            self.core.cancel(stream_id)
            call._on_end(status, (), abrupt=True)
        for answered in self._probes.values():
            if not answered.done():
                answered.cancel()
        self._room.set()
        self.driver.release_waiters()
        self.driver.wake()

    async def _peer_ended(self) -> Ending:
        """End our side too and learn the carrying call's status (bounded)."""
        cause: BaseException = TunnelClosedError("the peer closed the tunnel")
        carrier = self.carrier
        try:
            async with asyncio.timeout(self.options.close_timeout):
                if carrier.can_half_close:
                    await carrier.end()
                await carrier.finish()
        except TimeoutError:
            pass
        except Exception as exc:
            cause = exc
        reason = EndReason.PEER_STATUS if isinstance(cause, GRPCError) else EndReason.PEER_CLOSED
        message = closed_message(describe(cause))
        return Ending(Status.UNAVAILABLE, message, cause, graceful=False, reason=reason)

    async def _wind_down(self, ending: Ending, reader: asyncio.Task[None]) -> None:
        """The owner's close: let the cancels out, end our side, await the peer's."""
        carrier = self.carrier
        with contextlib.suppress(Exception):
            async with asyncio.timeout(self.options.close_timeout):
                await self.driver.drain()
                if not carrier.can_half_close:
                    # A network server ends the call by returning from its
                    # handler, not by half-closing: nothing to wait for.
                    return
                await carrier.end()
                await asyncio.wait([reader])
                if not reader.cancelled() and reader.exception() is None:
                    await carrier.finish()

    async def _after(self, ending: Ending) -> None:
        with contextlib.suppress(Exception):
            await self.carrier.aclose()
