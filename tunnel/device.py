"""A device: the client that dials out and serves calls over reverse tunnels.

A ``ReverseTunnelServer`` opens ``OpenReverseTunnel`` to a network server
(a device behind NAT registering with a router; a client that takes pushed
requests with real request/response semantics) and serves, over that one
call, the RPCs the network server sends it, with the handlers a grpclib
``Server`` would take.  ``serve_forever`` keeps one tunnel open across
drops (docs/reconnecting.md).  The network server's side is
``tunnel.reverse`` and ``tunnel.TunnelServiceHandler``.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection
from typing import Any, TypeVar

import grpclib.client
from google.protobuf.empty_pb2 import Empty
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from multidict import MultiDict

from ._core.connection import KEEPALIVE_METHOD
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._retry import PERMANENT_STATUSES, MetadataSource, Retry, check_callback, resolve_metadata
from ._server_tunnel import Handlers, ServerTunnel, open_server_tunnel
from ._stats import TunnelStatistics
from ._tasks import Flag, call_back
from ._tunnel import as_status
from ._typing import Servable
from ._wire import MAX_STREAMS_HEADER, NEGOTIATE_HEADER, OPEN_REVERSE_TUNNEL, opening_timed_out
from .fallback import Fallback
from .options import TunnelOptions

__all__ = ["ReverseTunnelServer"]

log = logging.getLogger("tunnel")

_T = TypeVar("_T")

#: The ``OpenReverseTunnel`` call, from the device's side.
_CarryingCall = grpclib.client.Stream[ServerToClient, ClientToServer]

#: Options are frozen: devices made without any share one.
_DEFAULT_OPTIONS = TunnelOptions()


class _Closed(Exception):
    """``close()`` ended a ``serve()`` that was still opening or ending its call."""


class ReverseTunnelServer:
    """Serves RPCs that a network server sends back over reverse tunnels.

    ``handlers`` are what a ``grpclib.server.Server`` takes; methods none of
    them serves go to ``fallback`` if given (a ``Proxy`` to a local backend,
    say; see ``tunnel.fallback``).  Server events listened on this object
    fire for the tunneled handlers.
    """

    def __init__(
        self,
        channel: grpclib.client.Channel,
        handlers: Collection[Servable],
        *,
        options: TunnelOptions | None = None,
        fallback: Fallback | None = None,
    ) -> None:
        self._channel = channel
        # With a fallback, every other method the network server sends goes to it.
        self._handlers = Handlers.of(handlers, fallback)
        self._options = options or _DEFAULT_OPTIONS
        self.__dispatch__ = self._handlers.dispatch
        # A device holds a tunnel or a few: a list, and Flags, cost a fraction
        # of a set and of asyncio.Event (see ``Flag``).
        self._tunnels: list[ServerTunnel] = []
        self._serving = 0
        self._idle = Flag()
        self._idle.set()
        self._closed = False
        self._stop_forever = Flag()
        #: The response headers of the most recently opened tunnel.
        self.response_metadata: MultiDict[Any] | None = None
        #: What the most recently ended tunnel carried, taken as it ended
        #: (``serve_forever``'s ``on_disconnected`` may read it).
        self.last_statistics: TunnelStatistics | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    def statistics(self) -> list[TunnelStatistics]:
        """What each open tunnel of this server carried so far."""
        return [tunnel.statistics() for tunnel in self._tunnels]

    async def serve(self, metadata: MetadataSource = None) -> None:
        """Open one reverse tunnel and serve it until it closes.

        Returns normally when the network server ended the tunnel (or
        ``close()`` was called); raises the carrying call's ``GRPCError``
        when the tunnel was refused or failed (UNAVAILABLE naming the cause
        when the connection was lost or the network server stopped
        answering keepalive checks), ``OpenTimeoutError`` when it could not
        be opened within ``negotiation_timeout``, and the ``OSError`` of a
        connection that could not be made.  May run several times at once:
        each call is one tunnel.  *metadata* may be a callable (plain or
        async) that returns it.
        """
        await self._serve(await resolve_metadata(metadata), None)

    async def _serve(
        self, metadata: MultiDict[Any], on_open: Callable[[], Awaitable[None]] | None
    ) -> None:
        if self._closed:
            raise GRPCError(Status.UNAVAILABLE, "reverse tunnel server is closed")
        # grpclib copies the request metadata: no local of this frame (which
        # lives as long as the tunnel) keeps ours.
        stream = self._channel.request(
            OPEN_REVERSE_TUNNEL,
            Cardinality.STREAM_STREAM,
            ServerToClient,
            ClientToServer,
            metadata=self._request_metadata(metadata),
        )
        self._serving += 1
        self._idle.clear()
        try:
            async with stream:
                # Opening and ending are coroutines of their own; serving is
                # here, so that an idle tunnel keeps one frame less.
                tunnel = await self._open(stream, metadata)
                self._tunnels.append(tunnel)
                try:
                    if on_open is not None:
                        await on_open()
                    await tunnel.serve()
                except Exception as exc:
                    if isinstance(exc.__cause__, StreamTerminatedError):
                        # The call was reset; the network server's status may
                        # be in its trailers, where leaving ``async with``
                        # looks for it.
                        raise exc.__cause__ from None
                    raise as_status(exc) from None
                finally:
                    if tunnel in self._tunnels:
                        self.last_statistics = tunnel.statistics()
                        self._tunnels.remove(tunnel)
                await self._end_call(stream)
        except _Closed:
            pass  # close() ended it; leaving ``async with`` reset the call
        except StreamTerminatedError as exc:
            # Leaving ``async with`` found no status in the call's trailers
            # (grpclib raises it from there when a reset came after one).
            raise as_status(exc) from None
        finally:
            self._serving -= 1
            if not self._serving:
                self._idle.set()

    def _request_metadata(self, metadata: MultiDict[Any]) -> MultiDict[Any]:
        """The carrying call's headers: *metadata* and what this end announces."""
        request_md: MultiDict[Any] = MultiDict(metadata)
        request_md[NEGOTIATE_HEADER] = "on"
        request_md[MAX_STREAMS_HEADER] = str(self._options.max_concurrent_streams)
        return request_md

    async def _open(self, stream: _CarryingCall, metadata: MultiDict[Any]) -> ServerTunnel:
        """Open the carrying call (bounded) and make its tunnel server."""
        # Opening waits on the network server, which may never answer:
        # close() must not wait for it, and it is bounded.
        timeout = self._options.negotiation_timeout
        step = "no connection"
        try:
            async with asyncio.timeout(timeout):
                await self._unless_closed(stream.send_request)
                step = "no response headers"
                await self._unless_closed(stream.recv_initial_metadata)
        except TimeoutError:
            raise opening_timed_out("the reverse tunnel", timeout, step, self._channel) from None
        # grpclib's own MultiDict, not a copy kept beside it for the tunnel's life.
        response_md: MultiDict[Any] = stream.initial_metadata or MultiDict()
        self.response_metadata = response_md
        tunnel = open_server_tunnel(
            stream,
            self._handlers,
            options=self._options,
            kind="reverse",
            metadata=metadata,
            response_metadata=response_md,
            peer_negotiates=response_md.get(NEGOTIATE_HEADER) == "on",
            user_agent=None,
            probe=self._probe_network_server,
        )
        if self._closed:
            raise _Closed
        return tunnel

    async def _end_call(self, stream: _CarryingCall) -> None:
        """End our side of the carrying call and wait (bounded) for its status."""
        with contextlib.suppress(Exception):
            await stream.end()
        # The network server ends the call once it sees our end (or it
        # already has, and its status is here).  Bounded: a server that
        # keeps the call open must not keep serve() (and close()) waiting.
        try:
            async with asyncio.timeout(self._options.close_timeout):
                await stream.recv_trailing_metadata()
        except TimeoutError:
            if self._closed:
                raise _Closed from None
            raise GRPCError(
                Status.UNAVAILABLE, "the network server did not end the tunnel's call"
            ) from None

    async def _probe_network_server(self) -> None:
        """Keepalive of a device: a call the network server answers at once.

        A device is the tunnel server and cannot start calls inside its
        tunnel, so it asks outside it, on the connection the tunnel runs on:
        a call to a method nobody serves.  Any status is an answer.  Unlike
        an HTTP/2 PING, the answer is data from the server, which grpc-go's
        ping policing counts in the device's favour (see docs/keepalive.md).
        A method, so that each tunnel's probe is a bound method, not a closure.
        """
        request = self._channel.request(KEEPALIVE_METHOD, Cardinality.UNARY_UNARY, Empty, Empty)
        try:
            async with request as call:
                await call.send_message(Empty(), end=True)
                await call.recv_message()
        except (GRPCError, StreamTerminatedError):
            pass

    async def _unless_closed(self, step: Callable[[], Awaitable[_T]]) -> _T:
        """Await ``step()``, unless ``close()`` comes first: then raise ``_Closed``."""
        if self._closed:
            raise _Closed
        work = asyncio.ensure_future(step())
        closing = asyncio.ensure_future(self._stop_forever.wait())
        try:
            await asyncio.wait({work, closing}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (work, closing):
                if not task.done():
                    task.cancel()
                    await asyncio.wait({task})
        if work.cancelled():
            raise _Closed
        return work.result()

    async def serve_forever(
        self,
        metadata: MetadataSource = None,
        *,
        min_backoff: float = 0.1,
        max_backoff: float = 30.0,
        jitter: float = 0.2,
        stable_after: float = 5.0,
        permanent_statuses: Collection[Status] = PERMANENT_STATUSES,
        permanent_attempts: int = 3,
        on_connected: Callable[[], object] | None = None,
        on_disconnected: Callable[[str], object] | None = None,
    ) -> None:
        """Keep one reverse tunnel open until ``close()``.

        When the tunnel or its connection drops (or cannot be opened), it is
        reopened after a backoff (see ``tunnel._retry``: exponential from
        ``min_backoff`` to ``max_backoff`` seconds, +/- ``jitter``, starting
        over once a tunnel stayed up ``stable_after`` seconds).  A refusal
        with one of ``permanent_statuses`` (UNIMPLEMENTED, UNAUTHENTICATED,
        PERMISSION_DENIED by default) is raised after ``permanent_attempts``
        of them in a row, instead of being retried forever.

        Each connection is logged at INFO (with the attempts it took and how
        long the device was without a tunnel), each drop and failed attempt
        at WARNING with its reason and the delay before the next.
        ``on_connected()`` and ``on_disconnected(reason)`` (plain or async)
        are called as the tunnel comes and goes.  *metadata* may be a
        callable (plain or async), called anew for every attempt.
        """
        check_callback(on_connected, "on_connected")
        check_callback(on_disconnected, "on_disconnected")
        retry = Retry(
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            jitter=jitter,
            stable_after=stable_after,
            permanent_statuses=permanent_statuses,
            permanent_attempts=permanent_attempts,
        )
        loop = asyncio.get_running_loop()
        down_since = loop.time()
        attempts = 0  # since the last tunnel opened
        for attempt in itertools.count(1):
            if self._closed:
                return
            attempts += 1
            opened_at: float | None = None

            async def connected(attempts: int = attempts, down_since: float = down_since) -> None:
                nonlocal opened_at
                opened_at = loop.time()
                retry.opened()
                log.info(
                    "reverse tunnel connected after %d attempt(s), %.2f s without a tunnel",
                    attempts,
                    opened_at - down_since,
                )
                if on_connected is not None:
                    await call_back(on_connected, what="on_connected")

            error: BaseException | None = None
            try:
                await self._serve(await resolve_metadata(metadata), connected)
                reason = "the network server closed the tunnel"
            except GRPCError as exc:
                error, reason = exc, f"{exc.status.name}: {exc.message}"
            except Exception as exc:  # the connection failed in some other way
                error, reason = exc, f"{type(exc).__name__}: {exc}"
            now = loop.time()
            if opened_at is not None:
                attempts = 0
                down_since = now
                retry.closed_after(now - opened_at)
                if on_disconnected is not None:
                    await call_back(on_disconnected, reason, what="on_disconnected")
            if self._closed:
                return
            if error is not None:
                try:
                    retry.failed(error)
                except GRPCError:
                    log.error("reverse tunnel refused (%s); giving up", reason)
                    raise
            delay = retry.next_delay()
            log.warning(
                "reverse tunnel attempt %d ended (%s); reconnecting in %.2f s",
                attempt,
                reason,
                delay,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(delay):
                    await self._stop_forever.wait()

    def close(self) -> None:
        """End every tunnel now; calls in flight are cancelled."""
        self._closed = True
        self._stop_forever.set()
        for tunnel in list(self._tunnels):
            tunnel.stop()

    async def graceful_stop(self) -> None:
        """Refuse new streams (UNAVAILABLE), wait for running calls, then close."""
        self._closed = True
        self._stop_forever.set()
        tunnels = list(self._tunnels)
        for tunnel in tunnels:
            tunnel.initiate_shutdown()
        await asyncio.gather(*(tunnel.wait_idle() for tunnel in tunnels))
        self.close()
        await self.wait_closed()

    async def wait_closed(self) -> None:
        """Wait until every ``serve()`` has returned."""
        await self._idle.wait()
