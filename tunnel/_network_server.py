"""The network server's side of both carrying calls, as one place handles them.

A ``TunnelServiceHandler`` serves ``OpenTunnel`` (we are the tunnel server:
``serve_forward``) and ``OpenReverseTunnel`` (we are the tunnel client:
``serve_reverse``).  Each runs in the task grpclib handles the carrying call
in, and so does the tunnel itself: an idle tunnel keeps no task of its own
beside it.  The affinity key function and the callbacks run in that task,
or in one started from it, so they see the context variables that server
event listeners set for that call.

Both share one workaround.  grpclib cancels a handler's task when its
connection is lost and also when its ``Server`` closes; in the second case
it sends nothing and leaves the connection open, so the peer -- and every
call in its tunnel -- would wait forever.  ``end_after_cancel`` ends the
carrying call with UNAVAILABLE when the connection is still there.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
from collections.abc import Awaitable, Callable, Hashable
from typing import Any

import grpclib.server
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from multidict import MultiDict

from ._carrier import StreamCarrier
from ._client_tunnel import ClientTunnel
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._pools import Pools
from ._seam import connection_is_lost, http2_pinger
from ._server_tunnel import Handlers, ServerTunnel, open_server_tunnel
from ._tasks import call_back, cancel_and_wait
from ._tunnel import Ending, closed_message, describe, reason_for
from ._violations import end_carrying_call
from ._wire import MAX_STREAMS_HEADER, NEGOTIATE_HEADER, announced_max_streams
from .channel import TunnelChannel
from .errors import RemoteProtocolError, TunnelClosedError
from .options import TunnelOptions

__all__ = ["AffinityKey", "TunnelCallback", "serve_forward", "serve_reverse"]

log = logging.getLogger("tunnel")

AffinityKey = Callable[[TunnelChannel], Hashable | Awaitable[Hashable]]
TunnelCallback = Callable[[TunnelChannel], object]


async def end_after_cancel(
    stream: grpclib.server.Stream[Any, Any], cause: str, timeout: float
) -> None:
    """End a carrying call whose handler grpclib cancelled (see the module docstring).

    Quietly does nothing if the connection is gone or the peer reset the call.
    """
    if connection_is_lost(stream):
        return
    with contextlib.suppress(Exception):
        async with asyncio.timeout(timeout):
            await stream.send_trailing_metadata(status=Status.UNAVAILABLE, status_message=cause)


async def serve_forward(
    stream: grpclib.server.Stream[Any, Any],
    handlers: Handlers,
    *,
    options: TunnelOptions,
    tunnels: set[ServerTunnel],
    shutting_down: bool,
) -> None:
    """Handle one ``OpenTunnel`` call until its tunnel ends."""
    peer_negotiates = stream.metadata is not None and (
        stream.metadata.get(NEGOTIATE_HEADER) == "on"
    )
    response_md: MultiDict[Any] = MultiDict(
        {NEGOTIATE_HEADER: "on", MAX_STREAMS_HEADER: str(options.max_concurrent_streams)}
    )
    # Headers go out at once, before any frame: the reference does so, and
    # listeners may put credentials in them.
    await stream.send_initial_metadata(metadata=response_md)
    tunnel = open_server_tunnel(
        stream,
        handlers,
        options=options,
        kind="forward",
        metadata=stream.metadata or MultiDict(),
        response_metadata=response_md,
        peer_negotiates=peer_negotiates,
        user_agent=stream.user_agent,
        probe=http2_pinger(stream),
    )
    if shutting_down:
        tunnel.initiate_shutdown()
    tunnels.add(tunnel)
    try:
        await tunnel.serve()
    except asyncio.CancelledError:
        # The handlers are cancelled by now and the frame writer stopped.
        await end_after_cancel(
            stream, "the tunnel's server is shutting down", options.close_timeout
        )
        raise
    except Exception as exc:
        raise end_carrying_call(exc, kind="forward", peer=stream.peer) from None
    finally:
        tunnels.discard(tunnel)


async def serve_reverse(
    stream: grpclib.server.Stream[Any, Any],
    pools: Pools,
    *,
    options: TunnelOptions,
    affinity_key: AffinityKey | None,
    on_open: TunnelCallback | None,
    on_close: TunnelCallback | None,
    draining: bool,
) -> None:
    """Handle one ``OpenReverseTunnel`` call until its tunnel ends.

    The tunnel runs in this task (``ClientTunnel.run``): an idle reverse
    tunnel keeps no main task of its own.  Registering it once it is open
    runs beside it, in a task that ends when that is done
    (``_Registration``).
    """
    # grpclib's own MultiDict, not a copy kept beside it for the tunnel's life.
    metadata: MultiDict[Any] = stream.metadata or MultiDict()
    peer_negotiates = metadata.get(NEGOTIATE_HEADER) == "on"
    await stream.send_initial_metadata(metadata={NEGOTIATE_HEADER: "on"})
    tunnel = _ReverseTunnel(
        StreamCarrier[ClientToServer, ServerToClient](
            stream, ServerToClient, max_frame_size=options.max_frame_size
        ),
        options,
        peer_negotiates=peer_negotiates,
        peer_max_streams=announced_max_streams(metadata),
    )
    channel = TunnelChannel(tunnel, metadata=metadata)
    registration = _Registration(
        tunnel,
        channel,
        pools,
        timeout=options.negotiation_timeout,
        affinity_key=affinity_key,
        on_open=on_open,
        draining=draining,
    )
    registration.start()
    try:
        try:
            await tunnel.run()
        except asyncio.CancelledError:
            await registration.stop()
            raise
        await registration.finish()
        if registration.refusal is not None:
            raise registration.refusal
    except asyncio.CancelledError:
        # The tunnel has ended (its calls failed with UNAVAILABLE, see
        # ``_ReverseTunnel``); end the carrying call too if the connection is
        # still there, so that the device reconnects.
        if registration.opened:
            registration.leave_pools()
            cause = _cancelled_cause(connection_is_lost(stream))
            await end_after_cancel(stream, cause, options.close_timeout)
        raise
    finally:
        registration.leave_pools()
        if registration.opened and on_close is not None:
            await call_back(on_close, channel, what="on_reverse_tunnel_close")
    if not registration.opened:
        error = tunnel.opening_error()
        if not isinstance(error, Exception):
            raise error
        raise end_carrying_call(error, kind="reverse", peer=stream.peer) from None
    if isinstance(tunnel.error, RemoteProtocolError):
        raise end_carrying_call(tunnel.error, kind="reverse", peer=stream.peer)


def _cancelled_cause(connection_lost: bool) -> str:
    """Why a reverse tunnel ends when grpclib cancels the task serving its call."""
    return "connection lost" if connection_lost else "the network server is stopping"


class _ReverseTunnel(ClientTunnel):
    """A reverse tunnel at the network server, run in the task grpclib serves
    its carrying call in.

    grpclib cancels that task when the connection is lost or the server is
    stopping: the tunnel's calls then fail with UNAVAILABLE naming which.
    """

    def _owner_cancelled(self) -> Ending:
        error = TunnelClosedError(_cancelled_cause(self.carrier.connection_lost()))
        message = closed_message(describe(error))
        return Ending(Status.UNAVAILABLE, message, error, graceful=False, reason=reason_for(error))


class _Registration:
    """A reverse tunnel's way into the pools, once it is open.

    Waits (``negotiation_timeout``) for the tunnel to open, then takes its
    affinity key, puts it in the pools and calls ``on_open``.  It runs in a
    task of its own, started from the handler's (so the key function and
    the callbacks see the context variables server event listeners set for
    the call), which nothing keeps once it is done.  A key function that
    refuses the tunnel closes it; the handler then ends the carrying call
    with that ``refusal``.
    """

    __slots__ = (
        "_affinity_key",
        "_channel",
        "_draining",
        "_key",
        "_on_open",
        "_pooled",
        "_pools",
        "_task",
        "_timeout",
        "_tunnel",
        "opened",
        "refusal",
    )

    def __init__(
        self,
        tunnel: ClientTunnel,
        channel: TunnelChannel,
        pools: Pools,
        *,
        timeout: float,
        affinity_key: AffinityKey | None,
        on_open: TunnelCallback | None,
        draining: bool,
    ) -> None:
        self._tunnel = tunnel
        self._channel = channel
        self._pools = pools
        self._timeout = timeout
        self._affinity_key = affinity_key
        self._on_open = on_open
        self._draining = draining
        self._key: Hashable = None
        self._pooled = False
        self._task: asyncio.Task[None] | None = None
        #: True once the tunnel opened (whatever happened next).
        self.opened = False
        #: The key function's refusal of the tunnel.
        self.refusal: GRPCError | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reverse-tunnel-registration")

    async def _run(self) -> None:
        try:
            if not await self._tunnel.wait_opened(self._timeout):
                return
            self.opened = True
            channel = self._channel
            if self._draining:
                channel.initiate_shutdown()
            if self._affinity_key is not None:
                try:
                    self._key = await _affinity_key(self._affinity_key, channel)
                except GRPCError as exc:
                    self.refusal = exc
                    channel.close()
                    return
            self._pools.add(channel, self._key)
            self._pooled = True
            if self._on_open is not None:
                await call_back(self._on_open, channel, what="on_reverse_tunnel_open")
        finally:
            self._task = None

    async def stop(self) -> None:
        """Cancel registering if it still runs, and wait until it has ended."""
        task = self._task
        if task is not None:
            await cancel_and_wait([task])

    async def finish(self) -> None:
        """The tunnel ended: end registering too.

        Still opening, it is cancelled; past that, the key function and
        ``on_open`` run to their end (as they would in the handler's task),
        unless the handler is cancelled meanwhile.
        """
        task = self._task
        if task is None:
            return
        if not self.opened:
            task.cancel()
        try:
            await asyncio.wait([task])
        except asyncio.CancelledError:
            await cancel_and_wait([task])
            raise

    def leave_pools(self) -> None:
        if self._pooled:
            self._pools.remove(self._channel, self._key)
            self._pooled = False


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
