"""A tunneled call as its handler sees it: grpclib's server ``Stream`` API.

Handlers written for ``grpclib.server.Server`` (grpclib-generated bases,
betterproto ``ServiceBase`` adapters, grpclib's Health service) receive one
of these and run unchanged.  The ``ProtocolError`` rules, events and the
mapping of outcomes to statuses follow grpclib's server ``Stream``.
"""

from __future__ import annotations

import asyncio
import functools
import logging
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import grpclib.server
from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import ProtocolError, StreamTerminatedError
from grpclib.metadata import Deadline, encode_metadata
from grpclib.protocol import Peer
from multidict import MultiDict

from ._inbox import Inbox
from ._seam import Metadata, MetadataLike, ServerEvents

if TYPE_CHECKING:
    from ._server_tunnel import ServerTunnel

__all__ = ["TunnelServerStream"]

log = logging.getLogger("tunnel")

_RecvType = TypeVar("_RecvType")
_SendType = TypeVar("_SendType")


class TunnelServerStream(
    grpclib.server.Stream[_RecvType, _SendType], Generic[_RecvType, _SendType]
):
    """One tunneled call on the serving side; see grpclib's server ``Stream``."""

    # grpclib.server.Stream.__init__ is deliberately not called: it expects
    # an HTTP/2 stream, which a tunneled call does not have.
    def __init__(
        self,
        tunnel: ServerTunnel,
        stream_id: int,
        method_name: str,
        cardinality: Cardinality,
        recv_type: type[_RecvType],
        send_type: type[_SendType],
        *,
        codec: CodecBase,
        status_details_codec: StatusDetailsCodecBase | None,
        dispatch: ServerEvents,
        deadline: Deadline | None,
        metadata: Metadata,
        user_agent: str | None,
        peer: Peer | None,
    ) -> None:
        self._tunnel = tunnel
        self._stream_id = stream_id
        self._method_name = method_name
        self._cardinality = cardinality
        self._recv_type = recv_type
        self._send_type = send_type
        self._codec = codec
        self._status_details_codec = status_details_codec
        self._dispatch = dispatch
        self.deadline = deadline
        self.metadata = metadata
        self.user_agent = user_agent
        self.peer = peer  # type: ignore[assignment]

        self._send_initial_metadata_done = False
        self._send_message_done = False
        self._send_trailing_metadata_done = False
        self._cancel_done = False

        self._inbox = Inbox(functools.partial(tunnel.acknowledge, stream_id))
        self._half_closed = False
        self._reset = False
        self._changed = asyncio.Event()

    # -- events from the tunnel ----------------------------------------------

    def _on_data(self, data: bytes, end_of_message: bool) -> None:
        if self._inbox.put(data, end_of_message):
            self._changed.set()

    def _on_half_close(self) -> None:
        self._half_closed = True
        self._changed.set()

    def _on_reset(self) -> None:
        self._reset = True
        self._inbox.clear()
        self._changed.set()

    @property
    def stream_id(self) -> int:
        """The tunnel's id of this stream."""
        return self._stream_id

    @property
    def method_name(self) -> str:
        """The full method name, ``/package.Service/Method``."""
        return self._method_name

    # -- the tunnel's side (with the ``_on_*`` events above) ------------------------

    @property
    def _owes_reply(self) -> bool:
        """True while a unary-response call has sent no message (OK would be wrong)."""
        return not self._cardinality.value.server_streaming and not self._send_message_done

    def _end_with(self, status: Status, message: str | None, details: Any = None) -> None:
        """End the call with a status now, unless it is over (its tunnel's last word).

        Used by the tunnel for what the handler did not say itself: it
        raised, was cancelled, or returned without a reply.
        """
        if self.closed:
            return
        proto = self._status_proto(status, message, details)
        if proto is None:
            proto = StatusProto(code=status.value)
        self._tunnel.close_stream(self._stream_id, proto, [])
        self._send_trailing_metadata_done = True

    @property
    def closed(self) -> bool:
        """True once the final status went out (or the stream was reset)."""
        return self._send_trailing_metadata_done or self._reset or self._cancel_done

    # -- receiving ---------------------------------------------------------------

    async def recv_message(self) -> _RecvType | None:
        while True:
            data = self._inbox.take()
            if data is not None:
                message = self._codec.decode(data, self._recv_type)
                (message,) = await self._dispatch.recv_message(message)
                return message  # type: ignore[no-any-return]
            if self._reset:
                raise StreamTerminatedError("stream was reset by the tunnel client")
            if self._half_closed:
                return None
            inbox = self._inbox
            inbox.reading = True
            self._changed.clear()
            try:
                await self._changed.wait()
            finally:
                inbox.reading = False

    # -- sending -----------------------------------------------------------------

    async def send_initial_metadata(self, *, metadata: MetadataLike | None = None) -> None:
        if self._send_initial_metadata_done:
            raise ProtocolError("Initial metadata was already sent")
        md: MultiDict[Any] = MultiDict(metadata or ())
        (md,) = await self._dispatch.send_initial_metadata(md)
        if md:
            encode_metadata(md)  # grpclib's own validation of keys and values
        self._send_initial_metadata_done = True
        if not self.closed:
            self._tunnel.send_headers(self._stream_id, list(md.items()))

    async def send_message(self, message: _SendType) -> None:
        if not self._send_initial_metadata_done:
            await self.send_initial_metadata()
        if not self._cardinality.value.server_streaming and self._send_message_done:
            raise ProtocolError("Message was already sent")
        (message,) = await self._dispatch.send_message(message)
        data = self._codec.encode(message, self._send_type)
        self._send_message_done = True
        if self.closed:
            raise StreamTerminatedError("stream is closed")
        await self._tunnel.send_message(self._stream_id, data)

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: Any = None,
        metadata: MetadataLike | None = None,
    ) -> None:
        if self._send_trailing_metadata_done:
            raise ProtocolError("Trailing metadata was already sent")
        if (
            not self._cardinality.value.server_streaming
            and not self._send_message_done
            and status is Status.OK
        ):
            raise ProtocolError(
                "Unary response with OK status requires a single message to be sent"
            )
        md: MultiDict[Any] = MultiDict(metadata or ())
        (md,) = await self._dispatch.send_trailing_metadata(
            md, status=status, status_message=status_message, status_details=status_details
        )
        if md:
            encode_metadata(md)
        proto = self._status_proto(status, status_message, status_details)
        if not self.closed:
            self._tunnel.close_stream(self._stream_id, proto, list(md.items()))
        self._send_trailing_metadata_done = True

    def _status_proto(
        self, status: Status, message: str | None, details: Any
    ) -> StatusProto | None:
        if status is Status.OK:
            return None
        if details is not None and self._status_details_codec is not None:
            try:
                encoded = self._status_details_codec.encode(status, message, details)
                return StatusProto.FromString(encoded)
            except Exception:
                # grpclib's server leaves its client hanging here; we send
                # the status without the details instead.
                log.exception("could not encode the status details of %s", self._method_name)
        return StatusProto(code=status.value, message=message or "")

    async def cancel(self) -> None:
        if self._cancel_done:
            raise ProtocolError("Stream was already cancelled")
        if not self.closed:
            self._tunnel.close_stream(
                self._stream_id,
                StatusProto(code=Status.CANCELLED.value, message="cancelled by the server"),
                [],
            )
        self._cancel_done = True
