"""Every place this package reaches into grpclib's private parts.

grpclib has no public API for a few things a tunnel needs.  Each such touch
lives in this module, as a small function whose docstring says what it
relies on and why no public API does the job, so a grpclib release that
moves one of them breaks here, by name, and nowhere else.
``tests/seam/`` checks that each of them still exists and behaves as
assumed.

The touches, one line each (keep this list in step with the code):

* ``grpclib.metadata._Metadata`` / ``_MetadataLike`` (``Metadata``,
  ``MetadataLike``): the metadata types grpclib's own signatures use.
* ``grpclib.events._DispatchChannelEvents`` / ``_DispatchServerEvents``
  (``ChannelEvents``, ``ServerEvents``): what ``grpclib.events.listen``
  finds in ``target.__dispatch__``, so that grpclib's events fire for
  tunneled calls as for direct ones.
* ``Channel._codec``, ``_status_details_codec``, ``_protocol`` and
  ``__dispatch__`` (``become_channel``, ``channel_codecs``): our channels
  subclass ``grpclib.client.Channel`` without its ``__init__`` (they have no
  connection), and set what grpclib reads; a user's channel's codecs are
  reused by tunnels opened over it.
* ``grpclib.client.Stream`` and ``grpclib.server.Stream`` subclassed
  without their ``__init__`` (``TunnelClientStream``, ``TunnelServerStream``):
  every public method is overridden, so none of grpclib's runs on them;
  ``tests/seam/`` checks that no public method is left to grpclib.
* ``DeadlineWrapper._error`` (``deadline_passed``): whether grpclib's
  deadline wrapper is the one that cancelled a task.

* ``Stream._stream`` (client and server): the HTTP/2 stream under a call,
  and through it ``.connection`` (grpclib's ``protocol.Connection``) and
  ``._transport`` (the asyncio transport).
* ``protocol.Connection.is_closing()``: whether the connection is gone.
* ``asyncio.Transport.abort()`` on that transport: cut a dead connection.
* ``protocol.Connection._connection`` (the ``h2`` connection), its
  ``ping()``, ``Connection.flush()``, and ``Connection.ping_ack_process``
  (called by grpclib for every PING ACK): an HTTP/2 PING and its answer.
* ``Channel._protocol.connection._connection`` (the h2 connection of a
  client channel), its ``open_outbound_streams`` and
  ``remote_settings.max_concurrent_streams``: why an opening waits
  (``http2_stream_limit_reached``).
* ``protocol.Stream.send_data`` (``send_data``): write many tunnel frames in
  one block of DATA.
* ``protocol.Stream.recv_data`` (``recv_data``), that is
  ``protocol.Buffer.read``: read the 5-byte gRPC prefix of a message before
  deciding to read its body; data is acknowledged as it is read.
* ``protocol.Stream.buffer`` and its ``_acked_size`` (``recv_some``): read
  the DATA taken from the connection and still unread, what has arrived
  of many frames at once.
* ``protocol.Stream.connection._connection`` (the ``h2`` connection), its
  ``update_settings`` and ``max_inbound_frame_size``
  (``receive_large_frames``): let the peer send longer HTTP/2 DATA frames
  on a carrying connection.
* ``protocol.Stream.window_updated``, ``headers_received`` and
  ``trailers_received``, and asyncio's ``Event._waiters``
  (``light_stream_events``): ``Flag``s instead of ``asyncio.Event``s on a
  carrying stream.
* ``H2Connection.incoming_buffer`` (h2's ``FrameBuffer``, wrapped) and
  hyperframe's ``Frame._body_repr`` (``skip_data_frame_dumps``): no hex dump
  of every DATA frame a carrying connection receives.
* ``client.Stream._wrapper`` (``call_wrapper``): so that a read outside
  grpclib's own methods still wakes up when the connection is lost.
* ``Server._mapping`` (the dict every connection looks methods up in
  with ``.get``) and ``Server._server`` (set by ``start()``): a fallback
  handler on a grpclib ``Server`` (``replace_server_mapping``).
* ``Stream._status_details_codec`` (client and server): status details
  passed through as bytes on one call (``use_status_details_codec``).
* ``protocol.Stream.headers`` / ``.trailers`` under a client ``Stream``:
  a status that arrived just before a reset (``received_status_headers``).
* ``Server._protocol_factory`` (wrapped, to see each accepted connection),
  ``H2Protocol.connection.close()``, and ``H2Protocol.connection_made``
  (wrapped on a connection still being accepted, to close it once made):
  ``record_connections`` / ``drop_connections``, so that a stopped
  server's connections end, those it was accepting as it stopped included.
* ``grpclib.utils._current_task`` (rebound): ``follow_asyncio_current_task``,
  for grpclib under trio-asyncio on Python 3.12+.
* ``Server._protocol_factory`` and ``Channel._protocol_factory`` (wrapped),
  and the transport ``H2Protocol.connection_made`` is given
  (``coalesce_writes``): a connection's writes of one loop iteration sent
  as one.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import weakref
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, cast

import grpclib.client
import grpclib.events
import grpclib.metadata
import grpclib.protocol
import grpclib.server
import grpclib.utils
from grpclib.const import Handler
from grpclib.encoding.base import CodecBase, StatusDetailsCodecBase
from h2.frame_buffer import FrameBuffer
from h2.settings import SettingCodes
from hyperframe.frame import DataFrame

from ._coalesce import CoalescingTransport
from ._tasks import Flag

__all__ = [
    "ChannelEvents",
    "Connections",
    "DataTruncated",
    "Metadata",
    "MetadataLike",
    "ServerEvents",
    "abort_connection",
    "become_channel",
    "call_wrapper",
    "channel_codecs",
    "coalesce_writes",
    "connection_is_lost",
    "deadline_passed",
    "drop_connections",
    "follow_asyncio_current_task",
    "http2_pinger",
    "http2_stream",
    "http2_stream_limit_reached",
    "light_stream_events",
    "receive_large_frames",
    "received_status_headers",
    "record_connections",
    "recv_data",
    "recv_some",
    "replace_server_mapping",
    "send_data",
    "skip_data_frame_dumps",
    "use_status_details_codec",
]


# -- names grpclib keeps private ------------------------------------------------

#: Metadata as grpclib hands it around (a ``MultiDict``), and what it accepts.
Metadata = grpclib.metadata._Metadata
MetadataLike = grpclib.metadata._MetadataLike
#: The event dispatchers ``grpclib.events.listen(target, ...)`` adds
#: listeners to, found in ``target.__dispatch__``.
ChannelEvents = grpclib.events._DispatchChannelEvents
ServerEvents = grpclib.events._DispatchServerEvents


def become_channel(
    channel: grpclib.client.Channel,
    *,
    codec: CodecBase,
    status_details_codec: StatusDetailsCodecBase | None,
) -> ChannelEvents:
    """Set what grpclib reads of a ``Channel`` on one made without ``__init__``.

    Our channels have no connection of their own, so they skip
    ``Channel.__init__`` (which would set up a host, a port and an event
    loop).  grpclib still reads a few attributes of any channel:
    ``__dispatch__`` (``grpclib.events.listen``), ``_protocol``
    (``Channel.close`` and ``__del__``: None, no connection), and the
    codecs stubs' calls are made with.  Returns the event dispatcher.
    """
    dispatch = ChannelEvents()
    channel.__dispatch__ = dispatch
    channel._codec = codec
    channel._status_details_codec = status_details_codec
    channel._protocol = None
    return dispatch


def channel_codecs(
    channel: grpclib.client.Channel,
) -> tuple[CodecBase | None, StatusDetailsCodecBase | None]:
    """The codecs a channel was made with, for a tunnel opened over it."""
    return getattr(channel, "_codec", None), getattr(channel, "_status_details_codec", None)


def deadline_passed(wrapper: grpclib.utils.Wrapper) -> bool:
    """True once grpclib's ``DeadlineWrapper`` cancelled its tasks.

    It records why in its private ``_error`` (the ``TimeoutError`` it will
    raise); a cancellation that comes with it is the deadline's, not the
    caller's.
    """
    return getattr(wrapper, "_error", None) is not None


def _connection(call: Any) -> Any:
    """grpclib's ``protocol.Connection`` under a call, or None.

    grpclib's client and server ``Stream`` keep their HTTP/2 stream in
    ``_stream`` and it keeps its connection in ``connection``.  A tunneled
    call (a stream of this package) has neither.
    """
    return getattr(getattr(call, "_stream", None), "connection", None)


def connection_is_lost(call: Any) -> bool:
    """True if the connection under a grpclib call is closed or closing.

    grpclib cancels a server handler both when its connection is lost and
    when its ``Server`` closes, and offers no public way to tell which.
    """
    connection = _connection(call)
    return connection is not None and bool(connection.is_closing())


def abort_connection(call: Any) -> None:
    """Cut the connection under a grpclib call at once, without a goodbye.

    For a peer that stopped answering: ``Channel.close()`` would only close
    the transport, which waits for unsent data to drain to a peer that
    takes none; ``abort()`` does not wait.  The channel then dials a new
    connection for its next call.  A tunneled call has no connection of
    its own; its tunnel's keepalive looks after the one under it.
    """
    transport = getattr(getattr(call, "_stream", None), "_transport", None)
    if transport is not None:
        transport.abort()


def http2_pinger(call: Any) -> Callable[[], Awaitable[None]] | None:
    """A function that pings the connection under a grpclib call, or None.

    Each call of the function sends an HTTP/2 PING and returns once an ACK
    arrives.  grpclib sends PINGs only for its own keepalive, configured
    through private fields for a whole server, and tells nobody about ACKs
    except its ``Connection.ping_ack_process``; so the connection's method
    is wrapped, once, to also wake our waiters.  Any ACK will do: a peer
    that acknowledges anything is alive.
    """
    connection = _connection(call)
    if connection is None or not hasattr(connection, "ping_ack_process"):
        return None
    waiters: list[asyncio.Future[None]] | None = getattr(connection, "_tunnel_ping_waiters", None)
    if waiters is None:
        waiters = []
        acknowledged = connection.ping_ack_process

        def ping_ack_process() -> None:
            acknowledged()
            assert waiters is not None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            waiters.clear()

        connection.ping_ack_process = ping_ack_process
        connection._tunnel_ping_waiters = waiters

    async def ping() -> None:
        assert waiters is not None
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            connection._connection.ping(os.urandom(8))
            connection.flush()
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)

    return ping


# -- reading and writing the carrying call's DATA ------------------------------


class DataTruncated(Exception):
    """The HTTP/2 stream ended after some, but not all, of the bytes asked for."""


def http2_stream(stream: object) -> grpclib.protocol.Stream | None:
    """The HTTP/2 stream under a grpclib client or server stream, or None.

    Relies on grpclib's ``client.Stream`` and ``server.Stream`` keeping it in
    ``_stream`` (client: set by ``send_request``; server: from the start).
    None for anything else, notably a stream that is itself tunneled (a
    tunnel nested in a tunnel), which has no HTTP/2 stream of its own.
    """
    h2 = getattr(stream, "_stream", None)
    return h2 if isinstance(h2, grpclib.protocol.Stream) else None


async def send_data(h2: grpclib.protocol.Stream, data: bytes) -> None:
    """Write ``data`` on the HTTP/2 stream, waiting for its flow-control window.

    grpclib's public ``send_message`` takes one message at a time, and each
    becomes its own DATA frame and socket write; tunnel frames are small
    and many, and writing a batch of them as one block is several times
    cheaper (see ``_carrier``).  ``protocol.Stream.send_data`` splits the
    block into DATA frames under the stream's window and the peer's frame
    size, exactly as grpclib's ``send_message`` does with one message.
    """
    await h2.send_data(data)


async def recv_data(h2: grpclib.protocol.Stream, size: int) -> bytes:
    """Exactly ``size`` bytes of the stream's DATA, in order.

    Returns ``b""`` if the peer ended the stream before the first of them;
    raises ``DataTruncated`` if it ended after some but not all.

    grpclib's public ``recv_message`` reads the 5-byte gRPC prefix and then
    however many bytes it announces, whatever that is: the only way to
    refuse a message before it is buffered is to read the prefix ourselves.
    ``protocol.Stream.recv_data`` is what ``recv_message`` uses underneath
    (``grpclib.stream.recv_message``).  It relies on ``protocol.Buffer.read``:
    DATA frames wait in the buffer *unacknowledged*, and a frame is
    acknowledged to the peer (HTTP/2 WINDOW_UPDATE) only when a read takes
    it, so data nobody reads stays within the stream's HTTP/2 window.  At
    the end of the stream the buffer returns ``b""`` when nothing was left,
    and raises ``AssertionError('Received less data than expected')`` when
    part of the requested bytes arrived (also on an empty DATA frame, which
    it takes for the end): that is turned into ``DataTruncated`` here.
    """
    try:
        return await h2.recv_data(size)
    except AssertionError:
        raise DataTruncated(f"the stream ended within {size} bytes of data") from None


async def recv_some(h2: grpclib.protocol.Stream, limit: int) -> list[bytes]:
    """What has arrived of the stream's DATA, at most ``limit`` bytes, in order.

    Waits for the first DATA frame if nothing is unread; returns ``[]`` at
    the end of the stream (and raises ``DataTruncated`` where ``recv_data``
    would for an empty DATA frame before the end).  The bytes come as one or
    two parts, whose sum is between 1 and ``limit``.

    A carrying call's frames are small and many: reading each one's prefix
    and body with a ``recv_data`` apiece costs two reads per frame, where
    this costs two per HTTP/2 DATA frame, however many frames it holds.
    Relies on ``protocol.Stream.buffer`` (the ``protocol.Buffer`` that
    ``recv_data`` reads): ``read`` takes whole DATA frames off the
    connection, acknowledging each, and keeps what it did not return in the
    buffer, counted by ``_acked_size``, for the next read, which returns it
    without waiting (nor raising).  The buffer is read directly, not
    through ``recv_data``: an idle tunnel keeps this read pending, and every
    coroutine frame of it costs memory.  So a read of one byte waits for a DATA frame and
    leaves the rest of it unread, and a read of ``_acked_size`` bytes takes
    exactly what is unread.  Nothing beyond ``limit`` is acknowledged, so
    the peer's HTTP/2 window still bounds what it can make us hold.
    """
    buffer = h2.buffer
    ready = int(buffer._acked_size)
    if ready:
        return [await buffer.read(min(ready, limit))]
    try:
        first = await buffer.read(1)
    except AssertionError:
        raise DataTruncated("the stream ended within 1 byte of data") from None
    if not first:
        return []
    ready = min(int(buffer._acked_size), limit - 1)
    return [first, await buffer.read(ready)] if ready > 0 else [first]


def receive_large_frames(h2: grpclib.protocol.Stream, size: int) -> None:
    """Let the peer send HTTP/2 DATA frames of up to ``size`` bytes on this connection.

    h2 takes frames of at most 16 KiB (the HTTP/2 default of
    SETTINGS_MAX_FRAME_SIZE) unless told otherwise, and grpclib never tells
    it: a tunnel's batch of frames then crosses as one DATA frame per 16
    KiB, and h2 and grpclib spend as much per frame, whatever its size, as
    the tunnel spends on a chunk.  Announcing a larger maximum lets a peer
    that honours it (grpclib's ``send_data`` cuts DATA frames to the peer's
    announced maximum) send a batch in a few frames; a peer that does not
    (grpc-go sends 16 KiB frames regardless) is not affected, and neither
    is what this end sends.  The setting is the connection's: calls that
    share it may receive longer frames too, which HTTP/2 allows
    (RFC 9113, 6.5.2; up to 2**24 - 1).  Relies on
    ``protocol.Stream.connection`` (grpclib's ``Connection``), its
    ``_connection`` (the ``h2`` connection), whose ``update_settings`` sends
    a SETTINGS frame, and ``Connection.flush()`` to write it.  h2 applies
    the new maximum (``max_inbound_frame_size``) when the peer acknowledges
    it, but its frame buffer takes the maximum only at the start of each
    block of bytes it is fed: a peer's acknowledgement and its first longer
    frame read in one block would fail the connection.  So the maximum is
    raised here at once, as the sender of the setting may (it takes such
    frames from the moment it announces them).
    """
    connection = h2.connection
    h2_connection = connection._connection
    if h2_connection.max_inbound_frame_size < size:
        h2_connection.update_settings({SettingCodes.MAX_FRAME_SIZE: size})
        h2_connection.max_inbound_frame_size = size
        connection.flush()


def _not_dumped() -> str:
    return "(data not shown)"


class _FramesNotDumped:
    """h2's ``FrameBuffer`` of one connection, its DATA frames made cheap to ``repr``."""

    __slots__ = ("_frames",)

    def __init__(self, frames: Any) -> None:
        self._frames = frames

    def add_data(self, data: Any) -> None:
        self._frames.add_data(data)

    @property
    def max_frame_size(self) -> int:
        return int(self._frames.max_frame_size)

    @max_frame_size.setter
    def max_frame_size(self, size: int) -> None:
        self._frames.max_frame_size = size

    def __iter__(self) -> _FramesNotDumped:
        return self

    def __next__(self) -> Any:
        frame = next(self._frames)
        if type(frame) is DataFrame:
            frame._body_repr = _not_dumped  # type: ignore[method-assign]
        return frame


def skip_data_frame_dumps(h2: grpclib.protocol.Stream) -> None:
    """Spare h2 a hex dump of every DATA frame this connection receives.

    h2's ``H2Connection._receive_frame`` passes ``repr(frame)`` to its
    logger's ``trace`` for every frame, computing it although grpclib's
    logger (h2's ``DummyLogger``) throws it away; and hyperframe's ``repr``
    of a DATA frame serializes its body and hex-encodes all of it before
    keeping 20 characters: about 2 ns per byte received, 30 µs for 16 KiB,
    as much as the rest of h2's work on that frame.  A carrying connection
    receives every byte of its tunnels' messages in DATA frames, so this
    drops that work for the connection's DATA frames: their ``repr`` says
    "(data not shown)".  Nothing else changes (the frames, their order,
    h2's checks and events are h2's own).  Relies on: ``H2Connection``
    reads the frames it receives from its ``incoming_buffer`` (h2's
    ``FrameBuffer``), of which ``receive_data`` uses only ``add_data``,
    ``max_frame_size`` and iteration; and hyperframe's ``Frame.__repr__``
    calls ``self._body_repr()``, which an instance attribute overrides.
    Reached through ``protocol.Stream.connection._connection``.
    """
    h2_connection = h2.connection._connection
    frames = h2_connection.incoming_buffer
    if not isinstance(frames, _FramesNotDumped):
        h2_connection.incoming_buffer = cast(FrameBuffer, _FramesNotDumped(frames))


#: The ``asyncio.Event``s grpclib's ``protocol.Stream`` makes for itself.
_STREAM_EVENTS = ("window_updated", "headers_received", "trailers_received")


def light_stream_events(h2: grpclib.protocol.Stream) -> None:
    """Put ``Flag``s in place of the HTTP/2 stream's ``asyncio.Event``s.

    grpclib's ``protocol.Stream`` makes three ``asyncio.Event``s with it
    (``window_updated``, ``headers_received``, ``trailers_received``), each
    with an empty ``collections.deque`` of 760 bytes for its waiters.  A
    carrying stream lives as long as its tunnel: 4.5 KiB of every idle
    tunnel (both ends).  grpclib only calls their ``set``, ``clear`` and
    ``wait`` (``protocol.Stream.recv_headers``, ``recv_trailers`` and
    ``send_data``; its ``Connection`` on HEADERS, trailers and
    WINDOW_UPDATE), which a ``Flag`` has, with the same meaning; each keeps
    its state.  An event a task waits on is left as it is (a carrier is made
    once the response headers have arrived and before it sent any data,
    when none is).  Relies on those three attributes, and on asyncio's
    ``Event._waiters`` (the futures of the tasks waiting).
    """
    for name in _STREAM_EVENTS:
        event = getattr(h2, name, None)
        if type(event) is not asyncio.Event or event._waiters:
            continue
        flag = Flag()
        if event.is_set():
            flag.set()
        setattr(h2, name, flag)


def call_wrapper(stream: object) -> contextlib.AbstractContextManager[Any]:
    """The context a read of a client stream's data must run in.

    grpclib wakes a client call's waiting tasks on a lost connection or a
    reset stream only if they wait inside the call's ``Wrapper``
    (``client.Stream._wrapper``, entered by every public method of the
    stream): ``protocol.Stream.__terminated__`` cancels exactly those tasks,
    and the wrapper turns the cancellation into ``StreamTerminatedError``.
    The buffer itself never wakes up then.  A read through ``recv_data``
    from a client stream must therefore run inside this wrapper.  A server
    stream needs none: grpclib cancels the task that handles the call,
    which owns every task reading for it.
    """
    if isinstance(stream, grpclib.client.Stream):
        wrapper: contextlib.AbstractContextManager[Any] = stream._wrapper
        return wrapper
    return contextlib.nullcontext()


def replace_server_mapping(
    server: grpclib.server.Server,
    replace: Callable[[dict[str, Handler]], dict[str, Handler]],
) -> None:
    """Swap the method table of a grpclib ``Server`` for ``replace(table)``.

    grpclib answers a path missing from its table with UNIMPLEMENTED and has
    no hook for a catch-all.  Relies on: ``Server.__init__`` builds one dict,
    ``Server._mapping``; ``Server._protocol_factory`` hands that very object
    to each new connection's handler, and ``request_handler`` looks every
    call's ``:path`` up in it with ``mapping.get(path)``.  A ``dict``
    subclass that overrides ``get`` therefore decides, per call, which
    handler runs.  Connections made earlier keep the old table, so this is
    refused once the server has started (``Server._server`` is set by
    ``start()``).
    """
    if server._server is not None:
        raise RuntimeError("install a fallback before the server starts")
    server._mapping = replace(server._mapping)


def use_status_details_codec(
    stream: grpclib.client.Stream[Any, Any] | grpclib.server.Stream[Any, Any],
    codec: StatusDetailsCodecBase,
) -> None:
    """Make one call encode or decode its status details with ``codec``.

    The codec is otherwise chosen per channel or per server, but a proxy
    needs raw details on its own calls only, on a server whose other
    handlers keep the ordinary codec.  Relies on: grpclib's client and
    server ``Stream`` copy the codec into ``_status_details_codec`` in
    ``__init__`` and read that attribute only when the status arrives
    (client, ``_process_grpc_status``) or is sent (server,
    ``send_trailing_metadata``).  This package's tunnel streams subclass
    them and keep the same attribute, read at the same moments.
    """
    stream._status_details_codec = codec


def received_status_headers(
    stream: grpclib.client.Stream[Any, Any],
) -> list[tuple[str, str]] | None:
    """The header block that carried the call's status, if it has arrived.

    A grpclib server resets a call it failed while the client was still
    sending; the client's ``Stream`` then raises ``StreamTerminatedError``
    from every method, and its exit turns that into the ``GRPCError``
    without setting ``trailing_metadata``, although the trailers arrived
    before the reset.  Relies on: ``Stream._stream`` is the HTTP/2 stream
    (``grpclib.protocol.Stream``, set by ``send_request``), whose
    ``trailers`` and ``headers`` hold the header blocks as received
    (lists of name/value pairs, or None); a trailers-only response carries
    ``grpc-status`` in ``headers``.  Returns None for other stream classes.
    """
    h2_stream = getattr(stream, "_stream", None)  # as in _connection() above
    if not isinstance(h2_stream, grpclib.protocol.Stream):
        return None
    if h2_stream.trailers is not None:
        return list(h2_stream.trailers)
    headers = h2_stream.headers
    if headers is not None and any(name == "grpc-status" for name, _ in headers):
        return list(headers)
    return None


def http2_stream_limit_reached(channel: object) -> int | None:
    """The peer's limit of concurrent HTTP/2 streams, if ``channel`` is at it.

    A grpclib ``Channel`` whose connection has as many streams open as the
    server allows makes the next call wait, silently, until one ends
    (``protocol.Stream.send_request`` catches h2's ``TooManyStreamsError``).
    A tunnel is a stream that lasts, so an opening that times out there
    should say why.  Relies on ``Channel._protocol`` (the ``H2Protocol`` of
    the current connection), its ``connection._connection`` (the h2
    connection), and h2's ``open_outbound_streams`` and
    ``remote_settings.max_concurrent_streams``.
    """
    protocol = getattr(channel, "_protocol", None)
    h2 = getattr(getattr(protocol, "connection", None), "_connection", None)
    if h2 is None:
        return None
    limit = int(h2.remote_settings.max_concurrent_streams)
    return limit if int(h2.open_outbound_streams) >= limit else None


class Connections:
    """The connections a server accepted (held weakly), and whether they were dropped.

    Once dropped, a connection that the server is still in the middle of
    accepting (asyncio made its protocol, or will, but has not called
    ``connection_made`` yet) is closed the moment it is made: otherwise a
    connection accepted just before ``Server.close()`` outlives the server,
    and the event loop's end finds its socket open.  ``wait_closed`` waits
    until every one of them has been closed by asyncio (its socket with it).
    """

    __slots__ = ("_closed", "_open", "_protocols", "dropped")

    def __init__(self) -> None:
        self._protocols: weakref.WeakSet[Any] = weakref.WeakSet()
        self.dropped = False
        #: Connections accepted and not yet lost (their socket still open).
        self._open = 0
        self._closed: asyncio.Event | None = None

    def __len__(self) -> int:
        return len(self._protocols)

    def __iter__(self) -> Iterator[Any]:
        return iter(list(self._protocols))

    def add(self, protocol: Any) -> None:
        self._protocols.add(protocol)
        self._open += 1
        connection_lost = protocol.connection_lost

        def lost(exc: Exception | None) -> None:
            try:
                connection_lost(exc)
            finally:
                self._open -= 1
                if not self._open and self._closed is not None:
                    self._closed.set()

        protocol.connection_lost = lost
        if self.dropped:
            _close_when_made(protocol)

    async def wait_closed(self) -> None:
        """Wait until every connection accepted so far is closed (bound it yourself).

        First one pass of the event loop: a connection accepted just before
        the server stopped listening gets its protocol then (asyncio makes it
        in a task of its own), and is counted.
        """
        await asyncio.sleep(0)
        while self._open:
            self._closed = closed = asyncio.Event()
            await closed.wait()


def record_connections(server: grpclib.server.Server) -> Connections:
    """The connections ``server`` accepts from now on (a live, weak view).

    grpclib's ``Server.close()`` stops listening and cancels running
    handlers but leaves accepted connections open, and they go on accepting
    calls for the stopped server's handlers; grpclib has no API to end them.
    Relies on ``Server._protocol_factory``, which makes the ``H2Protocol``
    of each accepted connection.  Held weakly: a connection that ended is
    forgotten with it.
    """
    connections = Connections()
    _each_new_protocol(server, connections.add)
    return connections


def _each_new_protocol(
    target: grpclib.server.Server | grpclib.client.Channel, see: Callable[[Any], None]
) -> None:
    """Call ``see`` with the ``H2Protocol`` of each connection ``target`` makes from now on.

    Relies on ``Server._protocol_factory`` and ``Channel._protocol_factory``:
    the method each makes a connection's protocol with, looked up on the
    instance when the server starts listening or the channel connects.
    """
    make_protocol = target._protocol_factory

    def factory() -> Any:
        protocol = make_protocol()
        see(protocol)
        return protocol

    target._protocol_factory = factory  # type: ignore[method-assign]


def drop_connections(connections: Connections) -> None:
    """Close each recorded connection's socket, as a process exit would.

    ``H2Protocol.connection`` exists once the connection was made; closing
    it closes the transport, and grpclib then fails that connection's
    streams as on any lost connection.  A connection not made yet, and any
    the server still accepts, is closed as soon as it is made (asyncio calls
    ``connection_made`` with the transport; the wrapper closes it after
    grpclib has seen it).
    """
    connections.dropped = True
    for protocol in connections:
        connection = getattr(protocol, "connection", None)
        if connection is not None:
            connection.close()
        else:
            _close_when_made(protocol)


def _close_when_made(protocol: Any) -> None:
    connection_made = protocol.connection_made

    def made(transport: asyncio.BaseTransport) -> None:
        connection_made(transport)
        transport.close()

    protocol.connection_made = made


def follow_asyncio_current_task() -> None:
    """Make grpclib find the running task through ``asyncio.current_task`` as it is now.

    ``grpclib.utils`` binds ``_current_task = asyncio.current_task`` when it
    is imported, and every grpclib call's ``Wrapper`` asks it for the task.
    trio-asyncio replaces ``asyncio.current_task`` when *it* is imported,
    because on Python 3.12+ the C version cannot see trio-asyncio's loop; if
    grpclib was imported first (``import tunnel`` does), it keeps the C
    version and every grpclib call on trio-asyncio's loop fails with
    "no running event loop".  Rebinding the name after trio-asyncio's import
    fixes that, whatever the import order.
    """
    if grpclib.utils._current_task is not asyncio.current_task:
        grpclib.utils._current_task = asyncio.current_task


def coalesce_writes(target: grpclib.server.Server | grpclib.client.Channel) -> None:
    """Send each connection's writes of one event-loop iteration as one write.

    For every connection ``target`` makes from now on (a ``Server`` before
    ``start()``, a ``Channel`` before its first call), see
    ``_coalesce.CoalescingTransport``.  grpclib writes each HTTP/2 frame
    with its own ``transport.write()`` and has no setting for anything
    else.  Relies on ``_each_new_protocol``'s touch, and on:
    ``H2Protocol.connection_made`` keeps the transport it is given (in its
    ``Connection`` and every ``Stream``), and grpclib uses only the public
    transport API on it (``write``, ``close``, ``is_closing``,
    ``get_extra_info``), as our own touches do (``abort``).
    """

    def coalescing(protocol: Any) -> None:
        connection_made = protocol.connection_made

        def made(transport: asyncio.BaseTransport) -> None:
            connection_made(CoalescingTransport(cast(asyncio.Transport, transport)))

        protocol.connection_made = made

    _each_new_protocol(target, coalescing)
