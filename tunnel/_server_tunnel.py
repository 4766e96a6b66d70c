"""The asyncio side of a tunnel server: one task per tunneled call.

A ``ServerTunnel`` owns a ``Driver`` around a ``TunnelServerProtocol`` and
runs each stream the client opens as a task that calls the registered
handler with a ``TunnelServerStream``, exactly as ``grpclib.server`` would.
Handler tasks are created from the task serving the carrying call, so they
see the context variables its event listeners set (an authenticated
identity, say) and ``current_tunnel()``.

Every stream ends with a ``close_stream``, whatever the handler does:
returns, raises, overruns its deadline, gets cancelled by the client or by
the end of the tunnel (grpclib itself leaves the client hanging in several
of these cases; see GRPCLIB-NOTES).
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import logging
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, cast

from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Handler, Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError
from grpclib.metadata import Deadline
from grpclib.protocol import Peer
from grpclib.utils import DeadlineWrapper, Wrapper
from multidict import MultiDict

from ._carrier import StreamCarrier
from ._core.events import DataReceived, Event, HalfClosed, StreamOpened, StreamReset
from ._core.metadata import MetadataError
from ._core.server import TunnelServerProtocol
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._seam import Metadata, ServerEvents
from ._server_stream import TunnelServerStream
from ._tasks import Flag, cancel_and_wait
from ._tunnel import Carrier, Ending, EndReason, Tunnel
from ._typing import Servable
from ._wire import PROTO_CODEC, PROTO_STATUS_DETAILS_CODEC
from .fallback import Fallback, fallback_cardinality, with_fallback
from .options import TunnelOptions

__all__ = ["Handlers", "ServerTunnel", "TunnelInfo", "current_tunnel", "open_server_tunnel"]

log = logging.getLogger("tunnel")


@dataclass(frozen=True, slots=True)
class TunnelInfo:
    """What a tunneled handler may want to know about its tunnel."""

    #: The request metadata of the call that opened the tunnel.
    metadata: MultiDict[Any]
    #: The response headers of that call (the network server's side).
    response_metadata: MultiDict[Any]
    #: The peer of the connection that carries the tunnel.
    peer: Peer | None
    #: "forward" or "reverse".
    kind: str


_current: contextvars.ContextVar[TunnelInfo | None] = contextvars.ContextVar(
    "tunnel_current", default=None
)

#: ``stop()``: handlers are cancelled, their final frames still go out.
_STOPPED_BY_OWNER = Ending(Status.CANCELLED, "tunnel closed", None, graceful=True)
#: The tunnel client half-closed the carrying call: a close in order.
_CLOSED_BY_CLIENT = Ending(
    Status.CANCELLED,
    "tunnel closed by the client",
    None,
    graceful=True,
    reason=EndReason.PEER_CLOSED,
)


@dataclass(frozen=True, slots=True)
class Handlers:
    """What serves the streams of a tunnel: the same for every tunnel of one
    ``TunnelServiceHandler`` (forward) or ``ReverseTunnelServer`` (a device).

    ``mapping`` is every method the handlers serve, with the fallback (if
    any) behind it; ``dispatch`` fires grpclib's server events, listened on
    the object that holds these handlers.
    """

    mapping: Mapping[str, Handler]
    dispatch: ServerEvents
    codec: CodecBase
    status_details_codec: StatusDetailsCodecBase | None

    @classmethod
    def of(cls, servables: Collection[Servable], fallback: Fallback | None) -> Handlers:
        mapping: dict[str, Handler] = {}
        for servable in servables:
            mapping.update(servable.__mapping__())
        return cls(
            mapping=with_fallback(mapping, fallback),
            dispatch=ServerEvents(),
            codec=PROTO_CODEC,
            status_details_codec=PROTO_STATUS_DETAILS_CODEC,
        )


def current_tunnel() -> TunnelInfo | None:
    """The tunnel the running handler was called through, or None.

    Works in any handler, including betterproto ones that never see their
    stream.
    """
    return _current.get()


class ServerTunnel(Tunnel[ClientToServer, ServerToClient]):
    """Serves the streams of one tunnel until its carrying call ends."""

    _role = "tunnel server"

    def __init__(
        self,
        carrier: Carrier[ClientToServer, ServerToClient],
        handlers: Handlers,
        *,
        info: TunnelInfo,
        options: TunnelOptions,
        peer_negotiates: bool,
        user_agent: str | None,
        probe: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        mapping = handlers.mapping
        self.core = TunnelServerProtocol(
            {name: handler.cardinality for name, handler in mapping.items()},
            peer_negotiates=peer_negotiates,
            max_concurrent_streams=options.max_concurrent_streams,
            fallback=fallback_cardinality(mapping),
            **options._protocol_settings(),
        )
        super().__init__(self.core, self.core.receive_frame, carrier, options)
        self._mapping = mapping
        self._info = info
        self._dispatch = handlers.dispatch
        self._codec = handlers.codec
        self._status_details_codec = handlers.status_details_codec
        self._user_agent = user_agent
        self._probe_peer = probe
        self._streams: dict[int, TunnelServerStream[Any, Any]] = {}
        self._tasks: dict[int, asyncio.Task[None]] = {}
        self._idle = Flag()
        self._idle.set()

    def initiate_shutdown(self) -> None:
        """Refuse new streams with UNAVAILABLE; running ones go on."""
        self.core.initiate_shutdown()

    async def wait_idle(self) -> None:
        """Wait until no tunneled call is running."""
        await self._idle.wait()

    def stop(self) -> None:
        """End the tunnel now: running calls are cancelled, ``serve`` returns."""
        self._request_stop(_STOPPED_BY_OWNER)

    async def serve(self) -> None:
        """Run until the tunnel ends.

        Returns when the tunnel client ended the carrying call in order or
        ``stop()`` was called; otherwise raises why the tunnel ended
        (``RemoteProtocolError`` if the client broke the protocol, the
        carrier's error if the call failed, ``KeepaliveTimeoutError``).
        """
        _current.set(self._info)
        await self._run()
        if self.error is not None:
            raise self.error

    # -- the life cycle ----------------------------------------------------

    def _end_streams(self, ending: Ending) -> None:
        # Each handler's task turns its cancellation into a close_stream.
        for task in self._tasks.values():
            task.cancel()

    async def _peer_ended(self) -> Ending:
        # The tunnel client closed the tunnel: it cancelled its streams first.
        return _CLOSED_BY_CLIENT

    async def _wind_down(self, ending: Ending, reader: asyncio.Task[None]) -> None:
        """Let the handlers' final ``close_stream`` frames out (bounded)."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(self.options.close_timeout):
                if self._tasks:
                    await asyncio.wait(list(self._tasks.values()))
                await self.driver.drain()

    async def _after(self, ending: Ending) -> None:
        await cancel_and_wait(list(self._tasks.values()))

    def _can_probe(self) -> bool:
        return self._probe_peer is not None

    async def _probe(self) -> None:
        assert self._probe_peer is not None
        await self._probe_peer()

    # -- events ------------------------------------------------------------

    def _on_events(self, events: list[Event]) -> None:
        streams = self._streams
        for event in events:
            if isinstance(event, DataReceived):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_data(event.data, event.end_of_message)
            elif isinstance(event, StreamOpened):
                self._start(event)
            elif isinstance(event, HalfClosed):
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_half_close()
            elif isinstance(event, StreamReset):
                self.driver.release_waiters(event.stream_id)
                stream = streams.get(event.stream_id)
                if stream is not None:
                    stream._on_reset()
                task = self._tasks.get(event.stream_id)
                if task is not None:
                    task.cancel()

    def _start(self, event: StreamOpened) -> None:
        handler = self._mapping[event.method]
        deadline = None if event.timeout is None else Deadline.from_timeout(event.timeout)
        stream: TunnelServerStream[Any, Any] = TunnelServerStream(
            self,
            event.stream_id,
            event.method,
            handler.cardinality,
            handler.request_type,
            handler.reply_type,
            codec=self._codec,
            status_details_codec=self._status_details_codec,
            dispatch=self._dispatch,
            deadline=deadline,
            metadata=cast(Metadata, MultiDict(event.metadata)),
            user_agent=self._user_agent,
            peer=self._info.peer,
        )
        # Registered before any await: frames that follow in the same read
        # must find the stream.
        self._streams[event.stream_id] = stream
        self._idle.clear()
        self._tasks[event.stream_id] = asyncio.create_task(
            self._run_handler(stream, handler), name=f"tunnel-handler-{event.method}"
        )

    # -- the calls' side ---------------------------------------------------------

    def acknowledge(self, stream_id: int, n: int) -> None:
        self.driver.acknowledge(stream_id, n)

    def send_headers(self, stream_id: int, metadata: list[tuple[str, str | bytes]]) -> None:
        if self.core.is_open(stream_id):
            self.core.send_headers(stream_id, metadata)
            self.driver.wake()

    async def send_message(self, stream_id: int, data: bytes) -> None:
        self.core.send_message(stream_id, data)
        self.driver.wake()
        await self.driver.flushed(stream_id)

    def close_stream(
        self,
        stream_id: int,
        status: StatusProto | None,
        trailers: list[tuple[str, str | bytes]],
    ) -> None:
        if self.core.is_open(stream_id):
            self.core.close_stream(stream_id, status, trailers)
            self.driver.wake()

    # -- running one handler -------------------------------------------------------

    async def _run_handler(self, stream: TunnelServerStream[Any, Any], handler: Handler) -> None:
        stream_id = stream.stream_id
        try:
            await self._call_handler(stream, handler)
        except asyncio.CancelledError:
            # Reset by the client (the core already sent the status, so this
            # sends nothing), or the tunnel is ending under the call: that is
            # not the caller's cancel, and a caller behind a proxy must see
            # it as the server side going away.
            ending = self._ending
            stream._end_with(Status.UNAVAILABLE, ending.message if ending else "tunnel closed")
        except GRPCError as exc:
            stream._end_with(exc.status, exc.message, exc.details)
        except MetadataError as exc:
            stream._end_with(Status.INTERNAL, str(exc))
        except Exception:
            log.exception("Application error in tunneled call %s", stream.method_name)
            stream._end_with(Status.UNKNOWN, "Internal Server Error")
        finally:
            if self.core.is_open(stream_id):  # defensive: never leave a stream open
                stream._end_with(Status.INTERNAL, "handler ended without a status")
            self._streams.pop(stream_id, None)
            self._tasks.pop(stream_id, None)
            self.driver.release_waiters(stream_id)
            if not self._tasks:
                self._idle.set()

    async def _call_handler(self, stream: TunnelServerStream[Any, Any], handler: Handler) -> None:
        wrapper: Wrapper
        deadline_ctx: contextlib.AbstractContextManager[Any]
        if stream.deadline is None:
            wrapper = Wrapper()
            deadline_ctx = contextlib.nullcontext()
        else:
            wrapper = DeadlineWrapper()
            deadline_ctx = wrapper.start(stream.deadline)
        started = False
        try:
            with deadline_ctx, wrapper:
                started = True
                stream.metadata, method_func = await self._dispatch.recv_request(
                    stream.metadata,
                    handler.func,
                    method_name=stream.method_name,
                    deadline=stream.deadline,
                    content_type="application/grpc",
                    user_agent=stream.user_agent,
                    peer=stream.peer,
                )
                await method_func(stream)
        except TimeoutError:
            # A deadline already past when the call arrived: grpclib's
            # DeadlineWrapper.start raises TimeoutError on entry without
            # marking the wrapper cancelled, and the handler never runs.
            if wrapper.cancelled or not started:
                raise GRPCError(Status.DEADLINE_EXCEEDED) from None
            raise
        if stream.closed:
            return
        if stream._owes_reply:
            log.error(
                "Unary response with OK status requires a single message to be sent: %r",
                stream.method_name,
            )
            stream._end_with(Status.UNKNOWN, "Internal Server Error")
            return
        await stream.send_trailing_metadata()


def open_server_tunnel(
    stream: Any,
    handlers: Handlers,
    *,
    options: TunnelOptions,
    kind: str,
    metadata: MultiDict[Any],
    response_metadata: MultiDict[Any],
    peer_negotiates: bool,
    user_agent: str | None,
    probe: Callable[[], Awaitable[None]] | None,
) -> ServerTunnel:
    """A tunnel server over a grpclib carrying call, either way it goes.

    The one place both server roles open their tunnel: a forward tunnel's
    network server (``stream`` is the grpclib server stream of
    ``OpenTunnel``) and a device (the client stream of ``OpenReverseTunnel``).
    ``kind`` ("forward" or "reverse") and the two header sets are what
    ``current_tunnel()`` shows tunneled handlers.
    """
    carrier = StreamCarrier[ServerToClient, ClientToServer](
        stream, ClientToServer, max_frame_size=options.max_frame_size
    )
    info = TunnelInfo(
        metadata=metadata, response_metadata=response_metadata, peer=stream.peer, kind=kind
    )
    return ServerTunnel(
        carrier,
        handlers,
        info=info,
        options=options,
        peer_negotiates=peer_negotiates,
        user_agent=user_agent,
        probe=probe,
    )
