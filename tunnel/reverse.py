"""Reverse tunnels: the network server calls services of clients that dialed in.

Two ends, two roles:

* The *network client* runs a ``ReverseTunnelServer``: it opens
  ``OpenReverseTunnel`` and serves, over that one call, the RPCs the network
  server sends it (a device behind NAT registering with a router; a client
  that takes pushed requests with real request/response semantics).
* The *network server*'s ``TunnelServiceHandler`` accepts those calls.  Each
  becomes a reverse ``TunnelChannel`` (a grpclib Channel whose calls go to
  that one client), kept in pools: all reverse tunnels, and one pool per
  affinity key.  ``ReverseChannel`` turns a pool into a channel that spreads
  calls round-robin over its tunnels.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import itertools
import logging
from collections.abc import Awaitable, Callable, Collection, Hashable, Mapping
from typing import Any, TypeVar

import grpclib.client
import grpclib.server
from google.protobuf.empty_pb2 import Empty
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline
from multidict import MultiDict

from ._carrier import StreamCarrier
from ._client_stream import TunnelClientStream
from ._client_tunnel import ClientTunnel
from ._core.connection import KEEPALIVE_METHOD
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._retry import PERMANENT_STATUSES, MetadataSource, Retry, check_callback, resolve_metadata
from ._seam import MetadataLike, ServerEvents, become_channel, connection_is_lost
from ._server_tunnel import ServerTunnel, TunnelInfo
from ._stats import TunnelStatistics
from ._tasks import call_back
from ._tunnel import as_status
from ._typing import Servable
from ._violations import end_carrying_call
from .channel import (
    MAX_STREAMS_HEADER,
    NEGOTIATE_HEADER,
    TunnelChannel,
    announced_max_streams,
    opening_timed_out,
)
from .errors import RemoteProtocolError, TunnelClosedError
from .fallback import Fallback, with_fallback
from .options import TunnelOptions

__all__ = ["ReverseChannel", "ReverseTunnelServer"]

log = logging.getLogger("tunnel")

OPEN_REVERSE_TUNNEL = "/grpctunnel.v1.TunnelService/OpenReverseTunnel"

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")
_T = TypeVar("_T")


# -- the network server's side ------------------------------------------------------


class _Pool:
    """The open reverse tunnels of one key (or all of them), in arrival order."""

    __slots__ = ("_next", "channels")

    def __init__(self) -> None:
        self.channels: list[TunnelChannel] = []
        self._next = 0

    def pick(self) -> TunnelChannel | None:
        """The next usable tunnel, round-robin; never one that has closed."""
        channels = self.channels
        for _ in range(len(channels)):
            self._next %= len(channels)
            channel = channels[self._next]
            self._next += 1
            if channel._tunnel.usable:
                return channel
        return None

    def has_usable(self) -> bool:
        return any(channel._tunnel.usable for channel in self.channels)


#: The key of the pool that holds every reverse tunnel.
ALL: Hashable = object()


class ReversePools:
    """Every reverse tunnel a ``TunnelServiceHandler`` holds, by affinity key.

    A pool exists only while it holds a tunnel, so keys that come and go
    (devices by id) leave nothing behind; a ``ReverseChannel`` names its
    pool by key and looks it up on every call.
    """

    def __init__(self) -> None:
        self._pools: dict[Hashable, _Pool] = {}
        self._waiters: set[asyncio.Future[None]] = set()

    def pick(self, key: Hashable) -> TunnelChannel | None:
        pool = self._pools.get(key)
        return None if pool is None else pool.pick()

    def is_ready(self, key: Hashable) -> bool:
        pool = self._pools.get(key)
        return pool is not None and pool.has_usable()

    def channels(self, key: Hashable = ALL) -> list[TunnelChannel]:
        pool = self._pools.get(key)
        return [] if pool is None else list(pool.channels)

    def add(self, channel: TunnelChannel, key: Hashable) -> None:
        for pool_key in (ALL, key):
            pool = self._pools.get(pool_key)
            if pool is None:
                pool = self._pools[pool_key] = _Pool()
            pool.channels.append(channel)
        waiters, self._waiters = self._waiters, set()
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def remove(self, channel: TunnelChannel, key: Hashable) -> None:
        for pool_key in (ALL, key):
            pool = self._pools.get(pool_key)
            if pool is None:
                continue
            with contextlib.suppress(ValueError):
                pool.channels.remove(channel)
            if not pool.channels:
                del self._pools[pool_key]

    async def wait_ready(self, key: Hashable) -> None:
        while not self.is_ready(key):
            fut = asyncio.get_running_loop().create_future()
            self._waiters.add(fut)
            try:
                await fut
            finally:
                self._waiters.discard(fut)


class ReverseChannel(grpclib.client.Channel):
    """A pool of reverse tunnels used as one channel.

    Each call goes to the next ready tunnel, round-robin.  With no tunnel in
    the pool a call fails at once with ``GRPCError(UNAVAILABLE)``.  Client
    events listened on this channel fire for the calls sent through it.
    """

    # grpclib's Channel.__init__ is deliberately not called (no connection).
    def __init__(self, pools: ReversePools, key: Hashable, description: str) -> None:
        self._pools = pools
        self._key = key
        self._description = description
        self.__dispatch__ = become_channel(
            self, codec=ProtoCodec(), status_details_codec=ProtoStatusDetailsCodec()
        )

    def is_ready(self) -> bool:
        """True if a call made now has a tunnel to go to."""
        return self._pools.is_ready(self._key)

    async def wait_ready(self) -> None:
        """Return as soon as the pool has a usable tunnel (bound it yourself)."""
        await self._pools.wait_ready(self._key)

    def request(
        self,
        name: str,
        cardinality: Cardinality,
        request_type: type[_SendType],
        reply_type: type[_RecvType],
        *,
        timeout: float | None = None,
        deadline: Deadline | None = None,
        metadata: MetadataLike | None = None,
    ) -> TunnelClientStream[_SendType, _RecvType]:
        channel = self._pools.pick(self._key)
        if channel is None:
            raise GRPCError(Status.UNAVAILABLE, f"no reverse tunnel {self._description}")
        return channel._call(
            name,
            cardinality,
            request_type,
            reply_type,
            timeout=timeout,
            deadline=deadline,
            metadata=metadata,
            dispatch=self.__dispatch__,
            pick_another=self._pick_tunnel,
        )

    def _pick_tunnel(self) -> ClientTunnel | None:
        """The next usable tunnel of the pool, for a call its first one refused."""
        channel = self._pools.pick(self._key)
        return None if channel is None else channel._tunnel

    async def __connect__(self) -> Any:
        raise RuntimeError("a ReverseChannel has no connection of its own")

    def close(self) -> None:
        """Nothing to close: the tunnels belong to their handler."""

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        count = len(self._pools.channels(self._key))
        return f"<ReverseChannel {self._description}: {count} tunnel(s)>"


AffinityKey = Callable[[TunnelChannel], Hashable | Awaitable[Hashable]]
TunnelCallback = Callable[[TunnelChannel], object]


async def serve_reverse_tunnel(
    stream: grpclib.server.Stream[Any, Any],
    pools: ReversePools,
    *,
    options: TunnelOptions,
    affinity_key: AffinityKey | None,
    on_open: TunnelCallback | None,
    on_close: TunnelCallback | None,
    draining: Callable[[], bool],
) -> None:
    """Handle one ``OpenReverseTunnel`` call until the tunnel ends.

    Runs in the task grpclib handles the call in, so the affinity key
    function and the callbacks see the context variables that server event
    listeners set for this call.
    """
    metadata: MultiDict[Any] = MultiDict(stream.metadata or ())
    peer_negotiates = metadata.get(NEGOTIATE_HEADER) == "on"
    await stream.send_initial_metadata(metadata={NEGOTIATE_HEADER: "on"})
    tunnel = ClientTunnel(
        StreamCarrier[ClientToServer, ServerToClient](
            stream, ServerToClient, max_frame_size=options.max_frame_size
        ),
        options,
        peer_negotiates=peer_negotiates,
        peer_max_streams=announced_max_streams(metadata),
    )
    try:
        await tunnel.start(options.negotiation_timeout)
    except Exception as exc:
        raise end_carrying_call(exc, kind="reverse", peer=stream.peer) from None
    channel = TunnelChannel(tunnel, metadata=metadata)
    if draining():
        tunnel.draining = True
    key: Hashable = None
    pooled = False
    try:
        if affinity_key is not None:
            key = await _affinity_key(affinity_key, channel)
        pools.add(channel, key)
        pooled = True
        if on_open is not None:
            await call_back(on_open, channel, what="on_reverse_tunnel_open")
        await tunnel.wait_closed()
    except asyncio.CancelledError:
        # grpclib cancels this handler when the connection is lost, and when
        # its Server closes; then it sends nothing and leaves the connection
        # open: the device would serve a tunnel nobody uses, forever.  End
        # the tunnel (its calls fail with UNAVAILABLE) and, if the
        # connection is still there, end the carrying call with a status so
        # that the device reconnects.
        lost = connection_is_lost(stream)
        cause = "connection lost" if lost else "the network server is stopping"
        tunnel.abort(TunnelClosedError(cause))
        if pooled:
            pools.remove(channel, key)
            pooled = False
        with contextlib.suppress(Exception):
            async with asyncio.timeout(options.close_timeout):
                await tunnel.wait_closed()
                if not lost:
                    await stream.send_trailing_metadata(
                        status=Status.UNAVAILABLE, status_message=cause
                    )
        raise
    finally:
        if pooled:
            pools.remove(channel, key)
        if not tunnel.closed:
            channel.close()
        with contextlib.suppress(asyncio.CancelledError):
            await tunnel.wait_closed()
        if on_close is not None:
            await call_back(on_close, channel, what="on_reverse_tunnel_close")
    if isinstance(tunnel.error, RemoteProtocolError):
        raise end_carrying_call(tunnel.error, kind="reverse", peer=stream.peer)


async def _affinity_key(affinity_key: AffinityKey, channel: TunnelChannel) -> Hashable:
    """The pool key of a new reverse tunnel.

    A key function that raises ``GRPCError`` refuses the tunnel with that
    status (a router refusing a duplicate key, say); one that fails in any
    other way refuses it with INTERNAL, and the failure is logged.
    """
    try:
        key = affinity_key(channel)
        if inspect.isawaitable(key):
            key = await key
    except GRPCError:
        raise  # the key function refuses the tunnel, with the status it chose
    except Exception:
        log.exception("affinity_key function %r raised; reverse tunnel refused", affinity_key)
        refusal = "the network server could not register the tunnel"
        raise GRPCError(Status.INTERNAL, refusal) from None
    return key


# -- the network client's side ----------------------------------------------------------


async def _probe_network_server(channel: grpclib.client.Channel) -> None:
    """Keepalive of a device: a call the network server answers at once.

    A device is the tunnel server and cannot start calls inside its tunnel,
    so it asks outside it, on the connection the tunnel runs on: a call to a
    method nobody serves.  Any status is an answer.  Unlike an HTTP/2 PING,
    the answer is data from the server, which grpc-go's ping policing
    counts in the device's favour (see docs/keepalive.md).
    """
    try:
        async with channel.request(KEEPALIVE_METHOD, Cardinality.UNARY_UNARY, Empty, Empty) as call:
            await call.send_message(Empty(), end=True)
            await call.recv_message()
    except (GRPCError, StreamTerminatedError):
        pass


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
        mapping: dict[str, Handler] = {}
        for handler in handlers:
            mapping.update(handler.__mapping__())
        self._channel = channel
        # With a fallback, every other method the network server sends goes to it.
        self._mapping: Mapping[str, Handler] = with_fallback(mapping, fallback)
        self._options = options or TunnelOptions()
        self.__dispatch__ = ServerEvents()
        self._codec = ProtoCodec()
        self._status_details_codec = ProtoStatusDetailsCodec()
        self._tunnels: set[ServerTunnel] = set()
        self._serving = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closed = False
        self._stop_forever = asyncio.Event()
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
        request_md: MultiDict[Any] = MultiDict(metadata)
        request_md[NEGOTIATE_HEADER] = "on"
        request_md[MAX_STREAMS_HEADER] = str(self._options.max_concurrent_streams)
        stream = self._channel.request(
            OPEN_REVERSE_TUNNEL,
            Cardinality.STREAM_STREAM,
            ServerToClient,
            ClientToServer,
            metadata=request_md,
        )
        self._serving += 1
        self._idle.clear()
        try:
            async with stream:
                await self._serve_on(stream, metadata, on_open)
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

    async def _serve_on(
        self,
        stream: grpclib.client.Stream[ServerToClient, ClientToServer],
        metadata: MultiDict[Any],
        on_open: Callable[[], Awaitable[None]] | None,
    ) -> None:
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
        response_md: MultiDict[Any] = MultiDict(stream.initial_metadata or ())
        self.response_metadata = response_md
        channel = self._channel
        tunnel = ServerTunnel(
            StreamCarrier[ServerToClient, ClientToServer](
                stream, ClientToServer, max_frame_size=self._options.max_frame_size
            ),
            self._mapping,
            info=TunnelInfo(
                metadata=metadata,
                response_metadata=response_md,
                peer=stream.peer,
                kind="reverse",
            ),
            dispatch=self.__dispatch__,
            codec=self._codec,
            status_details_codec=self._status_details_codec,
            options=self._options,
            peer_negotiates=response_md.get(NEGOTIATE_HEADER) == "on",
            user_agent=None,
            probe=lambda: _probe_network_server(channel),
        )
        if self._closed:
            raise _Closed
        self._tunnels.add(tunnel)
        try:
            if on_open is not None:
                await on_open()
            await tunnel.serve()
        except Exception as exc:
            if isinstance(exc.__cause__, StreamTerminatedError):
                # The call was reset; the network server's status may be in
                # its trailers, where leaving ``async with`` looks for it.
                raise exc.__cause__ from None
            raise as_status(exc) from None
        finally:
            if tunnel in self._tunnels:
                self.last_statistics = tunnel.statistics()
            self._tunnels.discard(tunnel)
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
