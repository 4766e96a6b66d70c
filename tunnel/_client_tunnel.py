"""The asyncio side of a tunnel client: calls, their events, the life cycle.

A ``ClientTunnel`` owns one ``Driver`` (reader and writer tasks) around a
``TunnelClientProtocol`` and a table of the calls in flight.  It is the same
object for a forward tunnel (we are the network client) and a reverse one
(we are the network server): only the ``Carrier`` differs.

Life cycle.  The tunnel is open until one of these happens, and then every
call in flight ends with a status, at once:

* ``close()``: calls fail with CANCELLED, the core sends ``cancel`` for each,
  our side of the carrying call is closed, and the peer gets
  ``close_timeout`` seconds to end its side before the call is cut off.
* the peer ends the carrying call: calls fail with UNAVAILABLE.
* the peer breaks the protocol (``RemoteProtocolError``) or the connection
  dies: calls fail with UNAVAILABLE, and ``error`` says why.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING, Protocol

from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from grpclib.protocol import Peer

from ._core.client import TunnelClientProtocol
from ._core.events import DataReceived, Event, HeadersReceived, Negotiated, StreamEnded
from ._driver import Driver
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from .errors import NegotiationError, TunnelClosedError
from .options import TunnelOptions

if TYPE_CHECKING:
    from ._client_stream import TunnelClientStream

__all__ = ["Carrier", "ClientTunnel"]

log = logging.getLogger("tunnel")


class Carrier(Protocol):
    """The carrying gRPC stream, as seen by the tunnel client."""

    peer: Peer | None

    async def send(self, frame: ClientToServer) -> None: ...

    async def recv(self) -> ServerToClient | None: ...

    async def end(self) -> None:
        """Close our side of the carrying call (no more frames from us)."""

    async def finish(self) -> None:
        """The peer ended its side: collect the call's final status.

        Raises the carrying call's error (a ``GRPCError``) if it failed.
        """

    async def aclose(self) -> None:
        """Release the carrying call, cutting it off if still open."""


class ClientTunnel:
    """Calls in flight over one tunnel, and the tasks that carry them."""

    def __init__(self, carrier: Carrier, options: TunnelOptions, *, peer_negotiates: bool) -> None:
        self.options = options
        self.carrier = carrier
        self.core = TunnelClientProtocol(
            peer_negotiates=peer_negotiates, **options.protocol_settings()
        )
        self.driver: Driver[ServerToClient, ClientToServer] = Driver(
            self.core,
            self.core.receive_frame,
            carrier.send,
            carrier.recv,
            getattr(carrier, "send_batch", None),
        )
        self.calls: dict[int, TunnelClientStream[object, object]] = {}
        #: Why the tunnel ended; None while open and after a clean close.
        self.error: BaseException | None = None
        self.closing = False
        #: Set by a handler's ``initiate_shutdown``: new calls are refused
        #: with UNAVAILABLE while running ones finish.
        self.draining = False
        self._negotiated = asyncio.Event()
        if self.core.ready:
            self._negotiated.set()
        self._main: asyncio.Task[None] | None = None
        self._closer: asyncio.Task[None] | None = None
        self._closed = asyncio.Event()

    # -- starting --------------------------------------------------------

    async def start(self) -> None:
        """Start the tasks and wait until streams may be created."""
        self._main = asyncio.create_task(self._run(), name="tunnel-client")
        if self.core.ready:
            return
        ready = asyncio.create_task(self._negotiated.wait())
        try:
            done, _ = await asyncio.wait(
                {ready, self._main},
                timeout=self.options.negotiation_timeout,
                return_when=asyncio.FIRST_COMPLETED,
            )
        finally:
            ready.cancel()
        if self._negotiated.is_set():
            return
        if not done:
            self.error = NegotiationError(
                f"tunnel server sent no settings within {self.options.negotiation_timeout} seconds"
            )
        # No call ever ran on this tunnel and the peer is not following the
        # protocol: cut the carrying call off now.  A graceful close() would
        # wait up to close_timeout more for a peer that may never answer.
        self.closing = True
        self._main.cancel()
        await asyncio.wait([self._main])
        if self.error is None:
            self.error = NegotiationError("tunnel server ended the call without sending settings")
        raise self.error

    # -- the calls' side -------------------------------------------------

    def open_stream(
        self,
        call: TunnelClientStream[object, object],
        method: str,
        metadata: list[tuple[str, str | bytes]],
        cardinality: Cardinality,
        timeout: float | None,
    ) -> int:
        """Register a call and queue its ``new_stream``."""
        if self.closing or self._closed.is_set():
            raise TunnelClosedError(self._closed_reason())
        if self.draining:
            raise TunnelClosedError("tunnel is shutting down")
        stream_id = self.core.open_stream(method, metadata, cardinality, timeout=timeout)
        self.calls[stream_id] = call
        self.driver.wake()
        return stream_id

    def forget(self, stream_id: int) -> None:
        """A call is over: cancel its stream if it is still open."""
        self.calls.pop(stream_id, None)
        if self.core.is_open(stream_id):
            self.core.cancel(stream_id)
            self.driver.wake()
        self.driver.release_waiters(stream_id)

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.core.acknowledge(stream_id, n)
        if self.core.has_frames():
            self.driver.wake()

    # -- events ------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        calls = self.calls
        for event in events:
            if isinstance(event, DataReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_data(event.data, event.end_of_message)
            elif isinstance(event, HeadersReceived):
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_headers(event.metadata)
            elif isinstance(event, StreamEnded):
                self.driver.release_waiters(event.stream_id)
                call = calls.get(event.stream_id)
                if call is not None:
                    call._on_end(event.status, event.trailers, abrupt=event.reset)
            elif isinstance(event, Negotiated):
                self._negotiated.set()

    # -- the life cycle ----------------------------------------------------

    async def _run(self) -> None:
        writer = asyncio.create_task(self._write(), name="tunnel-client-writer")
        try:
            await self.driver.read_loop(self._on_events)
            if not self.closing:
                await self.carrier.end()
            await self.carrier.finish()
        except asyncio.CancelledError:
            if not self.closing:
                raise
        except Exception as exc:
            if self.error is None:
                self.error = exc
            if not isinstance(exc, NegotiationError):
                log.debug("tunnel ended with an error", exc_info=True)
        finally:
            writer.cancel()
            self._fail_calls(Status.UNAVAILABLE, self._closed_reason())
            with contextlib.suppress(BaseException):
                await writer
            with contextlib.suppress(Exception):
                await self.carrier.aclose()
            self._closed.set()

    async def _write(self) -> None:
        try:
            await self.driver.write_loop()
        except Exception as exc:
            # The carrying call broke under us; the reader sees it end too.
            if self.error is None and not self.closing:
                self.error = exc
            if self._main is not None:
                self._main.cancel()

    def close(self) -> None:
        """Cancel every call and end the tunnel (see the module docstring)."""
        if self.closing:
            return
        self.closing = True
        self._fail_calls(Status.CANCELLED, "tunnel closed")
        if self._main is None or self._main.done():
            self._closed.set()
            return
        self._closer = asyncio.create_task(self._close(), name="tunnel-client-close")

    async def _close(self) -> None:
        main = self._main
        assert main is not None
        try:
            async with asyncio.timeout(self.options.close_timeout):
                await self.driver.drain()
                if not getattr(self.carrier, "can_half_close", True):
                    # A network server ends the carrying call by returning
                    # from its handler, not by half-closing: stop reading.
                    main.cancel()
                else:
                    await self.carrier.end()
                    await asyncio.shield(main)
        except (TimeoutError, Exception):
            main.cancel()
        with contextlib.suppress(BaseException):
            await main

    async def wait_closed(self) -> None:
        await self._closed.wait()
        if self._closer is not None:
            with contextlib.suppress(BaseException):
                await self._closer

    @property
    def closed(self) -> bool:
        return self._closed.is_set()

    @property
    def usable(self) -> bool:
        """True while new calls may start on this tunnel."""
        return not (self.closing or self.draining or self._closed.is_set())

    def _fail_calls(self, status: Status, message: str) -> None:
        calls = list(self.calls.items())
        for stream_id, call in calls:
            self.core.cancel(stream_id)
            call._on_end(StatusProto(code=status.value, message=message), (), abrupt=True)
        self.driver.release_waiters()
        self.driver.wake()

    def _closed_reason(self) -> str:
        if self.error is not None:
            return f"tunnel closed: {self.error}"
        return "tunnel closed"
