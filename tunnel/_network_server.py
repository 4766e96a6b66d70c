"""The network server's side of both carrying calls, as one place handles them.

A ``TunnelServiceHandler`` serves ``OpenTunnel`` (we are the tunnel server:
``serve_forward``) and ``OpenReverseTunnel`` (we are the tunnel client:
``serve_reverse``).  Each runs in the task grpclib handles the carrying call
in, so the affinity key function and the callbacks see the context
variables that server event listeners set for that call.

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
from ._tasks import call_back
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
        metadata=MultiDict(stream.metadata or ()),
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
    """Handle one ``OpenReverseTunnel`` call until its tunnel ends."""
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
    if draining:
        channel.initiate_shutdown()
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
        # End the tunnel (its calls fail with UNAVAILABLE), and the carrying
        # call if the connection is still there, so that the device reconnects.
        cause = (
            "connection lost" if connection_is_lost(stream) else "the network server is stopping"
        )
        tunnel.abort(TunnelClosedError(cause))
        if pooled:
            pools.remove(channel, key)
            pooled = False
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(options.close_timeout):
                await tunnel.wait_closed()
        await end_after_cancel(stream, cause, options.close_timeout)
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
