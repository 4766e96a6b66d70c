"""A transparent gRPC proxy: any call, forwarded as bytes to another channel.

``Proxy(target)`` is a fallback handler (see ``tunnel.fallback``): installed
on a grpclib ``Server``, a ``TunnelServiceHandler`` or a
``ReverseTunnelServer``, it forwards every call nobody else serves to
``target``, a ``grpclib.client.Channel`` (a plain one, a ``TunnelChannel``,
a ``ReverseChannel``) or a function that picks one per call.

Theory of operation.  The proxy knows neither the method's messages nor its
cardinality, and needs neither:

* Messages travel as ``RawMessage`` (bytes) through the server's and the
  channel's own codec; error details as ``RawStatusDetails`` (see
  ``tunnel.raw``), so detail types the proxy never heard of pass unchanged.
* Both calls are treated as bidirectional streams.  gRPC's wire format does
  not depend on the cardinality, so unary, client-, server- and
  bidi-streaming callers all work; checks such as "exactly one request"
  are left to the two ends, which know the method.
* Two loops relay one message at a time: requests (caller -> target) in a
  task of their own, which also sends the request headers, and responses
  (target -> caller) in the handler's own task, once the headers are out.
  Each receives a message only after the previous one was handed on, and
  handing on waits for the next hop's flow-control window, so the proxy
  holds at most one message per direction and a slow reader slows the
  sender end to end.  A failure of the caller's side interrupts the
  response loop (the request task cancels the handler's task), so it ends
  the call at once, whatever the target is doing.  Per call that is one
  task besides the handler's, and no ``asyncio.wait`` unless the caller
  still sends when the target has ended the call.
* Response headers are forwarded when the target sends them; a
  trailers-only answer stays trailers-only.  Once the response stream has
  ended the request loop stops (the call is over) and the target's status,
  message, details and trailers go back to the caller as they came.
* The caller's deadline goes to the target with the call.  When the
  caller's call ends early (cancelled, reset, past its deadline) the
  handler is cancelled, and leaving the target's ``async with`` resets the
  target's call, which cancels the target's handler in turn.

Metadata goes both ways minus ``HOP_BY_HOP``: the headers that belong to
one HTTP/2 or gRPC hop and are rebuilt by the next (``grpc-timeout`` from
the deadline, content type, user agent, connection headers).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable, Collection
from dataclasses import dataclass
from typing import Any

import grpclib.client
import grpclib.server
import h2.exceptions
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError
from grpclib.metadata import decode_bin_value, decode_grpc_message, decode_metadata
from multidict import MultiDict, MultiDictProxy, MultiMapping

from . import _seam
from .raw import RawMessage, RawStatusDetails, RawStatusDetailsCodec

__all__ = ["HOP_BY_HOP", "ChooseTarget", "Proxy"]

#: Headers never forwarded, in either direction: HTTP/1's hop-by-hop headers
#: (RFC 9110, 7.6.1; HTTP/2 forbids them), what grpclib and the tunnel
#: rebuild for each hop (``host``, ``te``, ``content-type``, ``user-agent``,
#: ``content-length``), and every ``grpc-`` header (``grpc-timeout`` is
#: rebuilt from the deadline; status, message and details travel as such).
#: Pseudo-headers (``:path`` and the like) never appear in metadata.
HOP_BY_HOP = frozenset(
    {
        "connection",
        "keep-alive",
        "proxy-connection",
        "proxy-authenticate",
        "proxy-authorization",
        "te",
        "trailer",
        "transfer-encoding",
        "upgrade",
        "host",
        "content-length",
        "content-type",
        "user-agent",
    }
)

#: ``choose(method_name, request_metadata)``: the channel for one call, or
#: an awaitable of it; raise ``GRPCError`` to refuse the call with a status.
#: The metadata is the caller's, all of it, read-only.
ChooseTarget = Callable[
    [str, "MultiMapping[Any]"], "grpclib.client.Channel | Awaitable[grpclib.client.Channel]"
]

#: How a call to the target breaks off without a status of its own: its
#: connection or stream is gone (grpclib leaks h2's exception from ``end()``
#: on a stream the server reset, GRPCLIB-NOTES 2.2).
_BROKEN = (StreamTerminatedError, OSError, h2.exceptions.H2Error)

_DETAILS_HEADER = "grpc-status-details-bin"

#: Status details as bytes, both ways (the codec keeps no state).
_RAW_DETAILS = RawStatusDetailsCodec()


class _CallOver(Exception):
    """Leaves the target's ``async with`` without waiting: the call is over."""


@dataclass(frozen=True, slots=True)
class _Ending:
    """How the target ended the call: what goes back to the caller."""

    status: Status
    message: str | None
    details: Any
    trailers: MultiDict[Any]

    @classmethod
    def of(cls, error: GRPCError, trailers: MultiDict[Any] | None) -> _Ending:
        return cls(error.status, error.message, error.details, trailers or MultiDict())


class Proxy:
    """A fallback handler that forwards each call to a target channel.

    ``target`` is a ``grpclib.client.Channel`` (plain, ``TunnelChannel`` or
    ``ReverseChannel``) or a ``ChooseTarget`` function given the method
    name and the request metadata, which returns the channel (or an
    awaitable of it, bounded by the call's deadline) or raises
    ``GRPCError`` (e.g. ``UNAVAILABLE``, ``INVALID_ARGUMENT``) to refuse
    the call.  ``drop_metadata`` names request and response headers not to
    forward, besides ``HOP_BY_HOP`` (``authorization``, say).

    Use it as ``install_fallback(server, proxy)``,
    ``TunnelServiceHandler(..., fallback=proxy)`` or
    ``ReverseTunnelServer(..., fallback=proxy)``; or call
    ``await proxy(method_name, stream)`` from a handler of your own.
    The proxy never closes its target channels.
    """

    def __init__(
        self,
        target: grpclib.client.Channel | ChooseTarget,
        *,
        drop_metadata: Collection[str] = (),
    ) -> None:
        self._target = target
        self._drop = HOP_BY_HOP | {key.lower() for key in drop_metadata}

    async def __call__(
        self, method_name: str, stream: grpclib.server.Stream[RawMessage, RawMessage]
    ) -> None:
        metadata: MultiDict[Any] = MultiDict(stream.metadata or ())
        channel = await self._choose(method_name, metadata)
        call: grpclib.client.Stream[RawMessage, RawMessage] = channel.request(
            method_name,
            Cardinality.STREAM_STREAM,
            RawMessage,
            RawMessage,
            deadline=stream.deadline,
            metadata=self.forwarded(metadata),
        )
        # Details come back from the target as bytes, and go out so.
        _seam.use_status_details_codec(call, _RAW_DETAILS)
        _seam.use_status_details_codec(stream, _RAW_DETAILS)
        ending = await _Relay(self, stream, call).run()
        await self._end(stream, ending)

    def forwarded(self, metadata: MultiDict[Any] | None) -> MultiDict[Any]:
        """``metadata`` without the headers this proxy does not forward."""
        if not metadata:
            return MultiDict()
        drop = self._drop
        return MultiDict(
            [
                (key, value)
                for key, value in metadata.items()
                if key not in drop and not key.startswith(("grpc-", ":"))
            ]
        )

    async def _choose(self, method_name: str, metadata: MultiDict[Any]) -> grpclib.client.Channel:
        target = self._target
        if isinstance(target, grpclib.client.Channel):
            return target
        chosen = target(method_name, MultiDictProxy(metadata))
        if isinstance(chosen, grpclib.client.Channel):
            return chosen
        return await chosen

    async def _end(
        self, stream: grpclib.server.Stream[RawMessage, RawMessage], ending: _Ending
    ) -> None:
        try:
            await stream.send_trailing_metadata(
                status=ending.status,
                status_message=ending.message,
                status_details=ending.details if ending.status is not Status.OK else None,
                metadata=self.forwarded(ending.trailers),
            )
        except ValueError as exc:  # trailers grpclib or the tunnel cannot carry
            await stream.send_trailing_metadata(
                status=Status.INTERNAL,
                status_message=f"the proxy cannot forward the target's trailers: {exc}",
            )


class _Relay:
    """One proxied call: the caller's ``stream`` relayed to and from ``call``.

    ``run()`` returns how the target ended the call, or raises
    ``GRPCError`` for what the proxy itself could not do; the caller's
    stream is left for the handler to end.  Every task it starts is done
    when it returns or raises.
    """

    def __init__(
        self,
        proxy: Proxy,
        stream: grpclib.server.Stream[RawMessage, RawMessage],
        call: grpclib.client.Stream[RawMessage, RawMessage],
    ) -> None:
        self._proxy = proxy
        self._stream = stream
        self._call = call
        #: Our side of the target's call is half-closed.
        self._ended = False
        #: The task relaying responses (the handler's), while it does.
        self._responder: asyncio.Task[Any] | None = None
        #: What failed on the caller's side, once the responder was told.
        self._failure: BaseException | None = None
        #: Set once the request headers went out: None, or how the call
        #: ended right there.
        self._opened: asyncio.Future[_Ending | None] = asyncio.get_running_loop().create_future()

    async def run(self) -> _Ending:
        call = self._call
        try:
            await call.__aenter__()
        except TimeoutError:  # the deadline had passed already
            raise GRPCError(Status.DEADLINE_EXCEEDED) from None
        try:
            ending = await self._relay()
        except BaseException as exc:
            # Leaving with an error resets the target's call if it is open:
            # that is how the target learns that the caller is gone.
            with contextlib.suppress(Exception):
                await call.__aexit__(type(exc), exc, exc.__traceback__)
            raise
        if call.trailing_metadata is not None and self._ended:
            # Both sides finished and the status was read: a normal exit
            # has nothing left to wait for (and counts the call a success).
            with contextlib.suppress(Exception):
                await call.__aexit__(None, None, None)
        else:
            # Over before both sides finished (a status while the caller
            # still sent, or a broken call): reset whatever is left.
            over = _CallOver()
            with contextlib.suppress(Exception):
                await call.__aexit__(_CallOver, over, None)
        return ending

    async def _relay(self) -> _Ending:
        requests = asyncio.create_task(self._requests(), name="proxy requests")
        try:
            ending = await self._responses_until_failure()
            # The call is over for the target: the request loop stops (it
            # has usually finished already: the caller half-closed).
            await _stop(requests)
            if ending is None:
                ending = await self._trailers()
            return ending
        finally:
            await _stop(requests)

    async def _requests(self) -> None:
        """Open the target's call, then caller -> target, one message at a time, then half-close.

        The request headers go out from this task, so that for the usual
        unary call headers, message and half-close leave in one step (one
        write, see ``tunnel._coalesce``).  A failure of the caller's side
        raises, and interrupts the response loop if it still runs; a
        failure of the target's side ends the loop quietly: the responses
        report how the call ended.
        """
        stream, call = self._stream, self._call
        try:
            if not await self._open():
                return
            while True:
                message = await stream.recv_message()
                try:
                    if message is None:
                        await call.end()
                        self._ended = True
                        return
                    await call.send_message(message)
                except (GRPCError, TimeoutError, *_BROKEN):
                    return
        except Exception as exc:
            responder = self._responder
            if responder is not None:
                self._failure = exc
                responder.cancel()
            raise

    async def _open(self) -> bool:
        """Send the request headers; False (and ``opened`` says why) if the call ended there."""
        call, opened = self._call, self._opened
        try:
            await call.send_request()
        except GRPCError as exc:  # a closed tunnel, say
            opened.set_result(_Ending.of(exc, None))
            return False
        except ValueError as exc:  # metadata grpclib or the tunnel cannot carry
            raise GRPCError(
                Status.INVALID_ARGUMENT, f"the proxy cannot forward the request metadata: {exc}"
            ) from None
        except (TimeoutError, *_BROKEN) as exc:
            opened.set_result(self._broken(exc))
            return False
        opened.set_result(None)
        return True

    async def _responses_until_failure(self) -> _Ending | None:
        """``_responses()`` in this task, unless the caller's side fails first."""
        task = asyncio.current_task()
        self._responder = task
        try:
            return await self._responses()
        except asyncio.CancelledError:
            failure = self._failure
            # Our own cancel (the request loop's) is taken back; one from
            # elsewhere (grpclib's, the caller being gone) still stands.
            if failure is not None and task is not None and task.uncancel() == 0:
                raise failure from None
            raise
        finally:
            self._responder = None

    async def _responses(self) -> _Ending | None:
        """Target -> caller: headers and messages; None if the status is still to come."""
        stream, call = self._stream, self._call
        ended_at_opening = await self._opened
        if ended_at_opening is not None:
            return ended_at_opening
        try:
            await call.recv_initial_metadata()
        except GRPCError as exc:  # trailers-only, or no gRPC answer at all
            return _Ending.of(exc, call.trailing_metadata)
        except (TimeoutError, *_BROKEN) as exc:
            return self._broken(exc)
        if call.trailing_metadata is not None:  # trailers-only, status OK
            return _Ending(Status.OK, None, None, call.trailing_metadata)
        try:
            await stream.send_initial_metadata(
                metadata=self._proxy.forwarded(call.initial_metadata)
            )
        except ValueError as exc:  # headers grpclib or the tunnel cannot carry
            raise GRPCError(
                Status.INTERNAL, f"the proxy cannot forward the target's response headers: {exc}"
            ) from None
        while True:
            try:
                message = await call.recv_message()
            except GRPCError as exc:  # a status while we were still sending
                return _Ending.of(exc, call.trailing_metadata)
            except (TimeoutError, *_BROKEN) as exc:
                return self._broken(exc)
            if message is None:
                return None
            await stream.send_message(message)

    async def _trailers(self) -> _Ending:
        """The target's status, once all its messages are forwarded.

        The request loop is stopped by now; grpclib lets a client read the
        trailers only after its own side is half-closed, so do that first.
        """
        call = self._call
        try:
            if not self._ended:
                await call.end()
                self._ended = True
            await call.recv_trailing_metadata()
        except GRPCError as exc:
            return _Ending.of(exc, call.trailing_metadata)
        except (TimeoutError, *_BROKEN) as exc:
            return self._broken(exc)
        return _Ending(Status.OK, None, None, call.trailing_metadata or MultiDict())

    def _broken(self, exc: BaseException) -> _Ending:
        """The ending of a call to the target that broke off without a status."""
        if isinstance(exc, TimeoutError):
            return _Ending(Status.DEADLINE_EXCEEDED, None, None, MultiDict())
        headers = _seam.received_status_headers(self._call)
        if headers is not None:  # the status came, then a reset hid it
            return _ending_from_headers(headers)
        return _Ending(
            Status.UNAVAILABLE,
            f"the call to the proxy's target broke off: {exc or type(exc).__name__}",
            None,
            MultiDict(),
        )


def _ending_from_headers(headers: list[tuple[str, str]]) -> _Ending:
    """Read a status out of the header block that carried it (as grpclib would)."""
    values = dict(headers)
    try:
        status = Status(int(values.get("grpc-status", "")))
    except ValueError:
        status = Status.UNKNOWN
    message = values.get("grpc-message")
    details_bin = values.get(_DETAILS_HEADER)
    details = None
    if details_bin is not None and status is not Status.OK:
        details = RawStatusDetails(decode_bin_value(details_bin.encode("ascii")))
    return _Ending(
        status,
        None if message is None else decode_grpc_message(message),
        details,
        MultiDict(decode_metadata(headers)),
    )


async def _stop(task: asyncio.Task[Any]) -> None:
    """Cancel ``task`` if it still runs, and wait until it is done.

    Its exception, if any, has been dealt with or no longer matters (the
    call is over either way): mark it retrieved, so asyncio does not log it.
    A task done already costs no wait (the common case: a caller that
    half-closed before the target answered).
    """
    if not task.done():
        task.cancel()
        await asyncio.wait({task})
    if not task.cancelled():
        task.exception()
