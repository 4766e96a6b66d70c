"""A tunneled call, with the API and behaviour of grpclib's client Stream.

Stubs of every flavour (grpclib, betterproto, betterproto2) only ever call
``channel.request(...)`` and then use the stream this module defines, so a
call over a tunnel runs the caller's code unchanged.  The rules mirror
grpclib's own ``Stream`` (same ``ProtocolError`` checks, events, deadline
handling through ``grpclib.utils.Wrapper``, ``async with`` exit rules), with
two deliberate differences that make tunnels safer than a bare connection:

* leaving ``async with`` normally while unread messages keep arriving never
  hangs: once the caller asks for the trailers, unread data is discarded and
  its window is given back, so the server can always finish;
* a call that ends because its tunnel went away fails with a ``GRPCError``
  (CANCELLED or UNAVAILABLE), never with a bare transport exception.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, Self, TypeVar, cast

import grpclib.client
from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, ProtocolError
from grpclib.metadata import Deadline, encode_metadata
from grpclib.utils import DeadlineWrapper, Wrapper
from multidict import MultiDict

from ._core.metadata import MetadataPairs
from ._inbox import Inbox
from ._seam import ChannelEvents, Metadata, MetadataLike, deadline_passed
from .errors import MetadataError, TunnelClosedError

if TYPE_CHECKING:
    from ._client_tunnel import ClientTunnel

__all__ = ["TunnelClientStream", "status_error"]

#: Bytes of request messages a call from a pool keeps until the server takes
#: it, to start it again elsewhere if its tunnel refuses it (``_retry_elsewhere``);
#: a call that sends more than this before any response headers is not retried.
REPLAY_LIMIT = 1 << 20

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")


class _DeadlineWrapper(DeadlineWrapper):
    """grpclib's deadline wrapper, leaving the caller's task as it found it.

    When the deadline passes, grpclib cancels the tasks waiting on the call
    and turns their ``CancelledError`` into ``asyncio.TimeoutError``, but
    leaves each task marked as being cancelled (``Task.cancelling()``).  A
    later ``asyncio.timeout()`` or ``TaskGroup`` in that task then misreads
    its own state.  The cancellation was ours, so we take it back.
    """

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        ours = deadline_passed(self) and exc_type is asyncio.CancelledError
        task = asyncio.current_task()
        try:
            super().__exit__(exc_type, exc_val, exc_tb)
        finally:
            if ours and task is not None and task.cancelling():
                task.uncancel()


def status_error(status: StatusProto, details_codec: StatusDetailsCodecBase | None) -> GRPCError:
    """The ``GRPCError`` a caller sees for a non-OK ``google.rpc.Status``."""
    try:
        code = Status(status.code)
    except ValueError:
        code = Status.UNKNOWN
    message = status.message or None
    details = None
    if status.details and details_codec is not None:
        details = details_codec.decode(code, message, status.SerializeToString())
    return GRPCError(code, message, details)


class TunnelClientStream(
    grpclib.client.Stream[_SendType, _RecvType], Generic[_SendType, _RecvType]
):
    """One call on a tunnel; see grpclib's ``Stream`` for the API."""

    # grpclib.client.Stream.__init__ is deliberately not called: it expects
    # an HTTP/2 connection, which a tunneled call does not have.
    _tunnel: ClientTunnel

    def __init__(
        self,
        tunnel: ClientTunnel | Callable[[], Awaitable[ClientTunnel]],
        name: str,
        metadata: Metadata,
        cardinality: Cardinality,
        send_type: type[_SendType],
        recv_type: type[_RecvType],
        *,
        codec: CodecBase,
        status_details_codec: StatusDetailsCodecBase | None,
        dispatch: ChannelEvents,
        deadline: Deadline | None = None,
        pick_another: Callable[[], ClientTunnel | None] | None = None,
    ) -> None:
        #: Where the call's tunnel comes from when it is not known yet (a
        #: channel that reopens tunnels): asked for when the request goes out.
        self._acquire: Callable[[], Awaitable[ClientTunnel]] | None = None
        if callable(tunnel):
            self._acquire = tunnel
            self.peer = None
        else:
            self._tunnel = tunnel
            self.peer = tunnel.carrier.peer
        self._name = name
        self._metadata = metadata
        self._cardinality = cardinality
        self._send_type = send_type
        self._recv_type = recv_type
        self._codec = codec
        self._status_details_codec = status_details_codec
        self._dispatch = dispatch
        self._deadline = deadline
        self._wrapper: Wrapper = Wrapper()
        self._wrapper_ctx = None
        self.initial_metadata = None
        self.trailing_metadata = None

        self._send_request_done = False
        self._send_message_done = False
        self._end_done = False
        self._recv_initial_metadata_done = False
        self._recv_trailing_metadata_done = False
        self._cancel_done = False
        self._trailers_only = False

        self._stream_id = 0
        #: Another tunnel of the call's pool, for one transparent retry of a
        #: call its tunnel refused before processing any of it; with what
        #: must be sent again (None once a retry is no longer possible).
        self._pick_another = pick_another
        self._replay: list[bytes] | None = [] if pick_another is not None else None
        self._replay_size = 0
        self._open_metadata: list[tuple[str, str | bytes]] = []
        self._headers: MetadataPairs | None = None
        self._inbox = Inbox()
        self._discard = False
        #: Set once the stream is over: (status or None for OK, trailers).
        self._end: tuple[StatusProto | None, MetadataPairs] | None = None
        self._abrupt = False
        self._changed = asyncio.Event()

    @classmethod
    def for_call(
        cls,
        tunnel: ClientTunnel | Callable[[], Awaitable[ClientTunnel]],
        name: str,
        cardinality: Cardinality,
        request_type: type[_SendType],
        reply_type: type[_RecvType],
        *,
        timeout: float | None,
        deadline: Deadline | None,
        metadata: MetadataLike | None,
        codec: CodecBase,
        status_details_codec: StatusDetailsCodecBase | None,
        dispatch: ChannelEvents,
        **more: Any,
    ) -> Self:
        """A call as ``Channel.request`` makes one: the earlier of ``timeout``
        and ``deadline`` is its deadline, as in grpclib."""
        if timeout is not None:
            timeout_deadline = Deadline.from_timeout(timeout)
            deadline = timeout_deadline if deadline is None else min(deadline, timeout_deadline)
        return cls(
            tunnel,
            name,
            cast(Metadata, MultiDict(metadata or ())),
            cardinality,
            request_type,
            reply_type,
            codec=codec,
            status_details_codec=status_details_codec,
            dispatch=dispatch,
            deadline=deadline,
            **more,
        )

    # -- events from the tunnel --------------------------------------------

    def _on_headers(self, metadata: MetadataPairs) -> None:
        self._headers = metadata
        self._replay = self._pick_another = None  # the server took the call
        self._changed.set()

    def _on_data(self, data: bytes, end_of_message: bool) -> None:
        if self._discard:
            self._tunnel.acknowledge(self._stream_id, len(data))
            return
        if self._inbox.put(data, end_of_message):
            self._changed.set()

    def _on_end(self, status: StatusProto | None, trailers: MetadataPairs, *, abrupt: bool) -> None:
        if self._end is not None:
            return
        if (
            status is not None
            and status.code == Status.UNAVAILABLE.value
            and self._headers is None
            and not abrupt
        ):
            # A close_stream before any headers: the tunnel server refused the
            # stream at creation, having processed none of it, because it
            # takes no new streams (it is shutting down).  Its pool should
            # send no more calls there, and this one may go elsewhere.
            self._tunnel.draining = True
            if self._retry_elsewhere():
                return
        self._end = (status, trailers)
        self._abrupt = abrupt
        if abrupt:
            self._inbox.clear()
        self._changed.set()

    def _retry_elsewhere(self) -> bool:
        """Start the call again on another tunnel of its pool (once).

        Runs synchronously, from the refusing tunnel's event: the requests
        sent so far are queued on the new stream at once, so the caller
        notices nothing.  Not possible once the request outgrew
        ``REPLAY_LIMIT`` or the pool has no other usable tunnel with room.
        """
        pick, replay = self._pick_another, self._replay
        self._pick_another = self._replay = None
        if pick is None or replay is None:
            return False
        tunnel = pick()
        if tunnel is None or tunnel is self._tunnel or tunnel.full():
            return False
        timeout = None if self._deadline is None else self._deadline.time_remaining()
        try:
            stream_id = tunnel.open_stream(
                self,  # type: ignore[arg-type]
                self._name,
                self._open_metadata,
                self._cardinality,
                timeout,
            )
        except (TunnelClosedError, MetadataError):
            return False
        self._tunnel.drop_call(self._stream_id)
        tunnel.queue_messages(stream_id, replay, end=self._end_done)
        self._tunnel = tunnel
        self._stream_id = stream_id
        self.peer = tunnel.carrier.peer
        self._inbox.acknowledge = functools.partial(tunnel.acknowledge, stream_id)
        return True

    def _keep_for_replay(self, data: bytes) -> None:
        replay = self._replay
        if replay is not None:
            self._replay_size += len(data)
            if self._replay_size > REPLAY_LIMIT:
                self._replay = self._pick_another = None
            else:
                replay.append(data)

    async def _wait_change(self) -> None:
        self._changed.clear()
        await self._changed.wait()

    def _raise_if_abrupt(self) -> None:
        if self._abrupt and self._end is not None and self._end[0] is not None:
            raise status_error(self._end[0], self._status_details_codec)

    # -- sending -------------------------------------------------------------

    async def send_request(self, *, end: bool = False) -> None:
        if self._send_request_done:
            raise ProtocolError("Request is already sent")
        if end and not self._cardinality.value.client_streaming:
            raise ProtocolError(
                "Unary request requires a message to be sent before ending outgoing stream"
            )
        with self._wrapper:
            metadata = self._metadata
            (metadata,) = await self._dispatch.send_request(
                metadata,
                method_name=self._name,
                deadline=self._deadline,
                content_type=self._codec_content_type(),
            )
            if metadata:
                encode_metadata(metadata)  # grpclib's own validation of keys and values
            if self._acquire is not None:
                # Waits for a usable tunnel, or fails fast, as the channel's
                # policy says; the deadline (this wrapper) bounds the wait.
                self._tunnel = await self._acquire()
                self.peer = self._tunnel.carrier.peer
            if self._tunnel.full():
                # The tunnel server's announced limit: wait for room rather
                # than be refused (the deadline bounds the wait).
                await self._tunnel.wait_for_room()
            timeout = None if self._deadline is None else self._deadline.time_remaining()
            self._open_metadata = list(metadata.items())
            try:
                self._stream_id = self._tunnel.open_stream(
                    self,  # type: ignore[arg-type]
                    self._name,
                    self._open_metadata,
                    self._cardinality,
                    timeout,
                )
            except TunnelClosedError as exc:
                raise GRPCError(Status.UNAVAILABLE, str(exc)) from None
            self._inbox.acknowledge = functools.partial(self._tunnel.acknowledge, self._stream_id)
            self._send_request_done = True
            if end:
                self._tunnel.half_close(self._stream_id)
                self._end_done = True

    def _codec_content_type(self) -> str:
        subtype = self._codec.__content_subtype__
        return f"application/grpc+{subtype}" if subtype else "application/grpc"

    async def send_message(self, message: _SendType, *, end: bool = False) -> None:
        if not self._send_request_done:
            await self.send_request()
        end_stream = end
        if not self._cardinality.value.client_streaming:
            if self._send_message_done:
                raise ProtocolError("Message was already sent")
            end_stream = True
        if self._end_done:
            raise ProtocolError("Stream is ended")
        with self._wrapper:
            (message,) = await self._dispatch.send_message(message)
            data = self._codec.encode(message, self._send_type)
            self._send_message_done = True
            if end_stream:
                self._end_done = True
            if self._end is not None:
                # The server already ended the call: grpclib drops the
                # message if it ended well and raises its error otherwise.
                status = self._end[0]
                if status is not None:
                    raise status_error(status, self._status_details_codec)
                return
            self._keep_for_replay(data)
            await self._tunnel.send_message(self._stream_id, data, end=end_stream)

    async def end(self) -> None:
        if not self._send_request_done:
            raise ProtocolError("Request was not sent")
        if self._end_done:
            raise ProtocolError("Stream was already ended")
        if not self._cardinality.value.client_streaming:
            if not self._send_message_done:
                raise ProtocolError("Unary request requires a single message to be sent")
            self._end_done = True
            return
        self._end_done = True
        if self._end is None:
            self._tunnel.half_close(self._stream_id)

    # -- receiving -------------------------------------------------------------

    async def recv_initial_metadata(self) -> None:
        if not self._send_request_done:
            raise ProtocolError("Request was not sent yet")
        if self._recv_initial_metadata_done:
            raise ProtocolError("Initial metadata was already received")
        with self._wrapper:
            while self._headers is None and self._end is None:
                await self._wait_change()
            self._raise_if_abrupt()
            if self._headers is not None:
                (metadata,) = await self._dispatch.recv_initial_metadata(MultiDict(self._headers))
                self.initial_metadata = metadata
                self._recv_initial_metadata_done = True
                return
            # Trailers only: the stream ended without headers.
            self._trailers_only = True
            (metadata,) = await self._dispatch.recv_initial_metadata(MultiDict())
            self.initial_metadata = metadata
            self._recv_initial_metadata_done = True
            await self._finish_trailers()

    async def recv_message(self) -> _RecvType | None:
        if not self._recv_initial_metadata_done:
            await self.recv_initial_metadata()
        with self._wrapper:
            data = await self._read_message()
            if data is None:
                return None
            message = self._codec.decode(data, self._recv_type)
            (message,) = await self._dispatch.recv_message(message)
            return message  # type: ignore[no-any-return]

    async def _read_message(self) -> bytes | None:
        while True:
            data = self._inbox.take()
            if data is not None:
                return data
            if self._end is not None:
                self._raise_if_abrupt()
                if self._end[0] is not None and not self._outgoing_ended():
                    # grpclib's server resets a call it failed, so a caller
                    # still sending sees the status here, not a bare end of
                    # stream followed by "Outgoing stream was not ended".
                    if not self._recv_trailing_metadata_done:
                        await self._finish_trailers()
                    raise status_error(self._end[0], self._status_details_codec)
                return None
            inbox = self._inbox
            inbox.reading = True
            try:
                await self._wait_change()
            finally:
                inbox.reading = False

    def _outgoing_ended(self) -> bool:
        return self._end_done or (
            not self._cardinality.value.client_streaming and self._send_message_done
        )

    async def recv_trailing_metadata(self) -> None:
        if not self._outgoing_ended():
            raise ProtocolError("Outgoing stream was not ended")
        if not self._recv_initial_metadata_done:
            raise ProtocolError(
                "Initial metadata was not received before waiting for trailing metadata"
            )
        if self._recv_trailing_metadata_done:
            raise ProtocolError("Trailing metadata was already received")
        if self._trailers_only:
            self._recv_trailing_metadata_done = True
            return
        with self._wrapper:
            # Nobody will read what is still unread: give its window back so
            # the server is never stuck behind it (grpclib would hang here).
            self._discard = True
            self._inbox.discard()
            while self._end is None:
                await self._wait_change()
                self._inbox.discard()
            await self._finish_trailers()

    async def _finish_trailers(self) -> None:
        assert self._end is not None
        status, trailers = self._end
        self._recv_trailing_metadata_done = True
        code = Status.OK
        message = None
        details = None
        error = None
        if status is not None:
            error = status_error(status, self._status_details_codec)
            code, message, details = error.status, error.message, error.details
        (metadata,) = await self._dispatch.recv_trailing_metadata(
            MultiDict(trailers), status=code, status_message=message, status_details=details
        )
        self.trailing_metadata = metadata
        if error is not None:
            raise error

    async def cancel(self) -> None:
        if not self._send_request_done:
            raise ProtocolError("Request was not sent yet")
        if self._cancel_done:
            raise ProtocolError("Stream was already cancelled")
        self._cancel_done = True
        self._tunnel.forget(self._stream_id)
        self._on_end(
            StatusProto(code=Status.CANCELLED.value, message="call cancelled"), (), abrupt=True
        )

    # -- async with --------------------------------------------------------------

    async def __aenter__(self) -> TunnelClientStream[_SendType, _RecvType]:
        if self._deadline is None:
            self._wrapper = Wrapper()
        else:
            wrapper = _DeadlineWrapper()
            self._wrapper = wrapper
            self._wrapper_ctx = wrapper.start(self._deadline)
            self._wrapper_ctx.__enter__()
        return self

    async def _maybe_finish(self) -> None:
        if not self._cancel_done:
            if not self._recv_initial_metadata_done:
                await self.recv_initial_metadata()
            if not self._recv_trailing_metadata_done:
                await self.recv_trailing_metadata()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if not self._send_request_done:
            if self._wrapper_ctx is not None:
                self._wrapper_ctx.__exit__(exc_type, exc_val, exc_tb)
            return
        try:
            if exc_val is None:
                try:
                    await self._maybe_finish()
                except BaseException as exc:
                    exc_type, exc_val, exc_tb = type(exc), exc, exc.__traceback__
                    raise
        finally:
            self._tunnel.forget(self._stream_id)
            if self._wrapper_ctx is not None:
                self._wrapper_ctx.__exit__(exc_type, exc_val, exc_tb)
