"""``TunnelChannel``: a grpclib ``Channel`` whose calls travel in a tunnel.

Every generated stub (grpclib's, betterproto's, betterproto2's) talks to its
channel only through ``request(...)`` and the stream it returns, so a
``TunnelChannel`` can stand wherever a ``grpclib.client.Channel`` does, and
``isinstance`` checks and type annotations agree.  ``open_tunnel`` makes one
over any channel, a ``TunnelChannel`` included: tunnels nest.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Generator
from types import TracebackType
from typing import Any, TypeVar

import grpclib.client
from grpclib.const import Cardinality, Status
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import Deadline, decode_grpc_message
from grpclib.protocol import Peer
from multidict import MultiDict

from ._carrier import StreamCarrier
from ._client_stream import TunnelClientStream
from ._client_tunnel import ClientTunnel
from ._pb.tunnel_pb2 import ClientToServer, ServerToClient
from ._seam import (
    MetadataLike,
    become_channel,
    channel_codecs,
    received_status_headers,
)
from ._stats import TunnelStatistics
from ._tunnel import EndReason
from ._wire import (
    NEGOTIATE_HEADER,
    OPEN_TUNNEL,
    PROTO_CODEC,
    PROTO_STATUS_DETAILS_CODEC,
    announced_max_streams,
    opening_timed_out,
)
from .options import TunnelOptions

__all__ = ["CallTarget", "CallingChannel", "TunnelChannel", "open_tunnel"]

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")


#: Where a call goes: a tunnel (or a function that finds one when the request
#: goes out), and more keyword arguments for its stream.
CallTarget = tuple[ClientTunnel | Callable[[], Awaitable[ClientTunnel]], dict[str, Any]]


class CallingChannel(grpclib.client.Channel):
    """What every channel of this package shares: ``request`` makes a tunneled call.

    grpclib's ``Channel.__init__`` is deliberately not called by any of them
    (they have no connection of their own: ``_seam.become_channel``).  Each
    says where its next call goes (``_call_target``); ``request`` keeps
    grpclib's exact signature, so every stub can call it.
    """

    def _call_target(self) -> CallTarget:
        raise NotImplementedError

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
        tunnel, more = self._call_target()
        return TunnelClientStream.for_call(
            tunnel,
            name,
            cardinality,
            request_type,
            reply_type,
            timeout=timeout,
            deadline=deadline,
            metadata=metadata,
            codec=self._codec,
            status_details_codec=self._status_details_codec,
            dispatch=self.__dispatch__,
            **more,
        )


class TunnelChannel(CallingChannel):
    """A channel whose calls all go to the one backend the tunnel reached."""

    # grpclib's Channel.__init__ is deliberately not called: it sets up a
    # host, a port and an HTTP/2 connection, none of which a tunnel has.
    def __init__(
        self,
        tunnel: ClientTunnel,
        *,
        metadata: MultiDict[Any],
        codec: CodecBase | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
    ) -> None:
        self._tunnel = tunnel
        self.__dispatch__ = become_channel(
            self,
            codec=codec or PROTO_CODEC,
            status_details_codec=status_details_codec or PROTO_STATUS_DETAILS_CODEC,
        )
        #: The metadata the tunnel was opened with.
        self.metadata = metadata

    @property
    def peer(self) -> Peer | None:
        """The peer of the connection that carries the tunnel."""
        return self._tunnel.carrier.peer

    @property
    def error(self) -> BaseException | None:
        """Why the tunnel closed; None while open or after a clean close."""
        return self._tunnel.error

    @property
    def closed(self) -> bool:
        return self._tunnel.closed

    @property
    def end_reason(self) -> EndReason | None:
        """Why the tunnel ended, as a value to count by; None while it is open."""
        return self._tunnel.end_reason

    def initiate_shutdown(self) -> None:
        """Start no new calls here: they fail with UNAVAILABLE (and a pool
        that holds this tunnel passes it by); calls in flight go on."""
        self._tunnel.draining = True

    async def wait_idle(self) -> None:
        """Wait until no call is in flight on this tunnel (bound it yourself)."""
        await self._tunnel.wait_idle()

    def statistics(self) -> TunnelStatistics:
        """What this tunnel carried so far: see ``TunnelStatistics``."""
        return self._tunnel.statistics()

    def _call_target(self) -> CallTarget:
        return self._tunnel, {}

    async def __connect__(self) -> Any:
        raise RuntimeError("a TunnelChannel has no connection of its own")

    def close(self) -> None:
        """Cancel every call in flight and end the tunnel."""
        self._tunnel.close()

    async def wait_closed(self) -> None:
        """Wait until the tunnel and its carrying call are over."""
        await self._tunnel.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> TunnelChannel:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def __del__(self) -> None:
        pass  # grpclib's warns about an unclosed HTTP/2 connection we never have

    def __repr__(self) -> str:
        state = "closed" if self.closed else "open"
        return f"<TunnelChannel {state} peer={self.peer and self.peer.addr()}>"


class _ForwardCarrier(StreamCarrier[ClientToServer, ServerToClient]):
    """The carrying ``OpenTunnel`` call, from the network client's side."""

    can_half_close = True

    def __init__(
        self,
        stream: grpclib.client.Stream[ClientToServer, ServerToClient],
        *,
        max_frame_size: int,
    ) -> None:
        super().__init__(stream, ServerToClient, max_frame_size=max_frame_size)
        self._ended = False
        self._finished = False

    async def recv(self) -> ServerToClient | None:
        try:
            return await super().recv()
        except StreamTerminatedError as exc:
            # grpclib's server resets a call it ended with an error status,
            # and the reset can overtake the status: look for it first.
            status = _status_before_reset(self._stream)
            if status is not None:
                raise status from exc
            raise

    async def end(self) -> None:
        if not self._ended:
            self._ended = True
            await self._stream.end()

    async def finish(self) -> None:
        await self._stream.recv_trailing_metadata()
        self._finished = True

    async def aclose(self) -> None:
        if self._finished:
            await self._stream.__aexit__(None, None, None)
            return
        await _reset(self._stream)


class _OpenTunnel:
    """``open_tunnel(...)``: awaitable, and an async context manager."""

    def __init__(
        self,
        channel: grpclib.client.Channel,
        metadata: MetadataLike | None,
        options: TunnelOptions,
    ) -> None:
        self._channel = channel
        self._metadata: MultiDict[Any] = MultiDict(metadata or ())
        self._options = options
        self._tunnel_channel: TunnelChannel | None = None

    async def _open(self) -> TunnelChannel:
        """Open the carrying call and the tunnel in it, within the time allowed.

        Every way out other than success (refused, timed out, cancelled,
        broken) leaves the carrying call reset.
        """
        timeout = self._options.negotiation_timeout
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        request_md: MultiDict[Any] = MultiDict(self._metadata)
        request_md[NEGOTIATE_HEADER] = "on"
        stream = self._channel.request(
            OPEN_TUNNEL,
            Cardinality.STREAM_STREAM,
            ClientToServer,
            ServerToClient,
            metadata=request_md,
        )
        await stream.__aenter__()
        step = "no connection"
        try:
            async with asyncio.timeout_at(deadline):
                await stream.send_request()
                step = "no response headers"
                # The network server sends its headers at once; a refused
                # tunnel (no services, bad credentials) ends here with its
                # GRPCError.
                await stream.recv_initial_metadata()
        except TimeoutError:
            await _reset(stream)
            raise opening_timed_out("the tunnel", timeout, step, self._channel) from None
        except BaseException as exc:
            refusal = await _exit_after_failure(stream, exc)
            if refusal is not None:
                raise refusal from None
            raise
        assert stream.initial_metadata is not None
        peer_negotiates = stream.initial_metadata.get(NEGOTIATE_HEADER) == "on"
        tunnel = ClientTunnel(
            _ForwardCarrier(stream, max_frame_size=self._options.max_frame_size),
            self._options,
            peer_negotiates=peer_negotiates,
            peer_max_streams=announced_max_streams(stream.initial_metadata),
        )
        # On failure or cancellation, start() has ended the tunnel, and the
        # carrying call with it.
        await tunnel.start(max(deadline - loop.time(), 0.0))
        codec, status_details_codec = channel_codecs(self._channel)
        self._tunnel_channel = TunnelChannel(
            tunnel,
            metadata=self._metadata,
            codec=codec,
            status_details_codec=status_details_codec,
        )
        return self._tunnel_channel

    def __await__(self) -> Generator[Any, None, TunnelChannel]:
        return self._open().__await__()

    async def __aenter__(self) -> TunnelChannel:
        return await self._open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        if self._tunnel_channel is not None:
            await self._tunnel_channel.aclose()


async def _exit_after_failure(
    stream: grpclib.client.Stream[Any, Any], exc: BaseException
) -> GRPCError | None:
    """Leave the failed carrying call; return the refusal it carried, if any.

    A server that refuses the tunnel answers trailers-only with its status
    and then resets the stream; the reset can reach grpclib first, so
    ``recv_initial_metadata`` raises ``StreamTerminatedError`` although the
    status arrived.  grpclib's exit turns that into the ``GRPCError``.
    """
    try:
        await stream.__aexit__(type(exc), exc, exc.__traceback__)
    except GRPCError as status:
        if isinstance(exc, StreamTerminatedError):
            return status
    except BaseException:
        pass
    return None


def _status_before_reset(stream: grpclib.client.Stream[Any, Any]) -> GRPCError | None:
    """The error status a call's peer sent before it reset the call, if any."""
    headers = dict(received_status_headers(stream) or ())
    try:
        code = Status(int(headers.get("grpc-status", "0")))
    except ValueError:
        code = Status.UNKNOWN
    if code is Status.OK:
        return None
    message = headers.get("grpc-message")
    return GRPCError(code, decode_grpc_message(message) if message else None)


async def _reset(stream: grpclib.client.Stream[Any, Any]) -> None:
    """Leave a carrying call that did not end in order: reset it, now.

    grpclib's normal exit would wait for trailers that may never come (the
    peer is gone or stuck); exiting with an error makes it reset the
    stream instead.
    """
    gone = StreamTerminatedError("tunnel closed")
    with contextlib.suppress(Exception):
        await stream.__aexit__(StreamTerminatedError, gone, None)


def open_tunnel(
    channel: grpclib.client.Channel,
    *,
    metadata: MetadataLike | None = None,
    options: TunnelOptions | None = None,
) -> _OpenTunnel:
    """Open a forward tunnel over ``channel`` (any grpclib Channel).

    Use it as ``async with open_tunnel(ch) as tunnel_channel:`` or as
    ``tunnel_channel = await open_tunnel(ch)`` (then close it yourself).  It
    returns once the tunnel is ready for calls; a tunnel the server refuses
    raises the carrying call's ``GRPCError``, and failed negotiation raises
    ``NegotiationError``.
    """
    return _OpenTunnel(channel, metadata, options or TunnelOptions())
