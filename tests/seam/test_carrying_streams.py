"""What ``tunnel._seam`` assumes of grpclib's private parts, checked on the real thing.

Each test pins one assumption a function of the seam documents, on a real
grpclib server and client over loopback, so that a grpclib release that
changes it fails here, by name.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpclib.client
import grpclib.protocol
import grpclib.server
import grpclib.utils
import h2.frame_buffer
import hyperframe.frame
import pytest
from grpclib.config import Configuration
from grpclib.const import Cardinality, Handler
from grpclib.exceptions import StreamTerminatedError

from tests.conftest import _listening_socket
from tests.integration.support import Proxy, connected
from tunnel import _seam
from tunnel._core.framing import frame_prefix
from tunnel._tasks import Flag
from tunnel.testing._pb.grpchantesting import Message

METHOD = "/seam.Test/Raw"
TIMEOUT = 10.0
#: The smallest HTTP/2 window grpclib allows (and the protocol's default).
WINDOW = 65_535

ServerSide = Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]


class Raw:
    """One bidi method whose server side is the test's coroutine."""

    def __init__(self, behave: ServerSide) -> None:
        self._behave = behave
        self.stream: asyncio.Future[grpclib.server.Stream[Any, Any]] | None = None

    def __mapping__(self) -> dict[str, Handler]:
        return {METHOD: Handler(self._behave, Cardinality.STREAM_STREAM, Message, Message)}


@asynccontextmanager
async def server(behave: ServerSide, config: Configuration | None = None) -> AsyncIterator[int]:
    srv = grpclib.server.Server([Raw(behave)], config=config)
    sock = _listening_socket()
    await srv.start(sock=sock)
    try:
        yield sock.getsockname()[1]
    finally:
        srv.close()
        async with asyncio.timeout(TIMEOUT):
            await srv.wait_closed()


def call(channel: grpclib.client.Channel) -> grpclib.client.Stream[Message, Message]:
    return channel.request(METHOD, Cardinality.STREAM_STREAM, Message, Message)


@asynccontextmanager
async def carrying_call(
    behave: ServerSide, config: Configuration | None = None, *, end: bool = False
) -> AsyncIterator[tuple[grpclib.client.Stream[Message, Message], grpclib.protocol.Stream]]:
    """A call to a server running ``behave``, its request headers sent (and
    its side ended with ``end``): the client stream and its HTTP/2 stream."""
    async with server(behave, config) as port, connected(port) as channel, call(channel) as stream:
        await stream.send_request(end=end)
        h2 = _seam.http2_stream(stream)
        assert h2 is not None
        yield stream, h2


# -- http2_stream -------------------------------------------------------------------


async def test_what_is_under_real_client_and_server_streams() -> None:
    """``http2_stream`` finds the HTTP/2 stream under both; ``call_wrapper``
    is the client call's ``Wrapper``, and nothing for a server stream."""
    seen: asyncio.Future[tuple[object, object]] = asyncio.get_running_loop().create_future()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        seen.set_result((_seam.http2_stream(stream), _seam.call_wrapper(stream)))
        await stream.recv_message()

    async with (
        asyncio.timeout(TIMEOUT),
        server(behave) as port,
        connected(port) as channel,
        call(channel) as stream,
    ):
        assert _seam.http2_stream(stream) is None  # no request sent yet
        assert isinstance(_seam.call_wrapper(stream), grpclib.utils.Wrapper)
        await stream.send_request()
        assert isinstance(_seam.http2_stream(stream), grpclib.protocol.Stream)
        server_h2, server_wrapper = await seen
        assert isinstance(server_h2, grpclib.protocol.Stream)
        assert not isinstance(server_wrapper, grpclib.utils.Wrapper)
        await stream.end()


def test_http2_stream_is_none_for_what_is_not_a_grpclib_stream() -> None:
    assert _seam.http2_stream(object()) is None

    class Impostor:
        _stream = "not an HTTP/2 stream"

    assert _seam.http2_stream(Impostor()) is None


# -- a write on the client's side, a read on the server's -------------------------------

Write = Callable[[grpclib.client.Stream[Any, Any], grpclib.protocol.Stream], Awaitable[None]]
Read = Callable[[grpclib.server.Stream[Any, Any]], Awaitable[object]]


async def read_on_server(write: Write, read: Read) -> object:
    """What ``read`` returns on the server's stream after ``write`` on the client's.

    ``write`` gets the client's grpclib stream and its HTTP/2 stream.
    """
    result: asyncio.Future[object] = asyncio.get_running_loop().create_future()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        try:
            result.set_result(await read(stream))
        except Exception as exc:
            result.set_exception(exc)
        await stream.send_trailing_metadata()

    async with asyncio.timeout(TIMEOUT), carrying_call(behave) as (stream, h2):
        await write(stream, h2)
        await stream.recv_initial_metadata()
        await stream.recv_trailing_metadata()
    return await result


def h2_of(stream: grpclib.server.Stream[Any, Any]) -> grpclib.protocol.Stream:
    h2 = _seam.http2_stream(stream)
    assert h2 is not None
    return h2


async def write_abc_and_end(stream: Any, h2: grpclib.protocol.Stream) -> None:
    await h2.send_data(b"abc")
    await stream.end()


# -- send_data ------------------------------------------------------------------------


async def test_send_data_writes_raw_grpc_messages_the_peer_parses() -> None:
    async def write(stream: Any, h2: grpclib.protocol.Stream) -> None:
        parts = [bytes(Message(payload=p)) for p in (b"one", b"two")]
        await _seam.send_data(h2, b"".join(frame_prefix(len(p)) + p for p in parts))
        await stream.end()

    async def read(stream: grpclib.server.Stream[Any, Any]) -> object:
        return [message.payload async for message in stream]

    assert await read_on_server(write, read) == [b"one", b"two"]


# -- recv_data ------------------------------------------------------------------------


async def test_recv_data_returns_exactly_the_bytes_asked_for_in_order() -> None:
    async def write(stream: Any, h2: grpclib.protocol.Stream) -> None:
        await h2.send_data(b"abc")
        await h2.send_data(b"defgh")
        await stream.end()

    async def read(stream: grpclib.server.Stream[Any, Any]) -> object:
        h2 = h2_of(stream)
        return [await _seam.recv_data(h2, n) for n in (2, 4, 2)]

    assert await read_on_server(write, read) == [b"ab", b"cdef", b"gh"]


async def test_recv_data_is_empty_at_the_end_of_the_stream() -> None:
    async def read(stream: grpclib.server.Stream[Any, Any]) -> object:
        h2 = h2_of(stream)
        return [await _seam.recv_data(h2, 3), await _seam.recv_data(h2, 5)]

    assert await read_on_server(write_abc_and_end, read) == [b"abc", b""]


async def test_recv_data_raises_when_the_stream_ends_within_the_bytes() -> None:
    async def read(stream: grpclib.server.Stream[Any, Any]) -> object:
        return await _seam.recv_data(h2_of(stream), 5)

    with pytest.raises(_seam.DataTruncated):
        await read_on_server(write_abc_and_end, read)


Reads = Callable[[grpclib.protocol.Stream], Awaitable[list[int]]]


async def held_at_the_window(total: int, first: Reads, rest: Reads) -> list[int]:
    """Send ``total`` bytes to a server that reads once (``first``), then waits.

    The sender must stop at the HTTP/2 window plus the one DATA frame the
    first read took off the connection; then the server reads the rest
    (``rest``).  Returns the sizes both reads returned.
    """
    config = Configuration(http2_connection_window_size=WINDOW, http2_stream_window_size=WINDOW)
    server_h2: asyncio.Future[grpclib.protocol.Stream] = asyncio.get_running_loop().create_future()
    read_all = asyncio.Event()
    got: list[int] = []

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        h2 = _seam.http2_stream(stream)
        assert h2 is not None
        server_h2.set_result(h2)
        got.extend(await first(h2))
        await read_all.wait()
        got.extend(await rest(h2))
        await stream.send_trailing_metadata()

    async with asyncio.timeout(TIMEOUT), carrying_call(behave, config) as (stream, h2):
        sending = asyncio.create_task(_seam.send_data(h2, b"\x00" * total))
        receiver = await server_h2
        # The sender stops when the window it was given is used up.
        h2_connection = h2._h2_connection
        assert h2.id is not None
        while h2_connection.local_flow_control_window(h2.id) > 0 and not sending.done():
            await asyncio.sleep(0.01)
        assert not sending.done()
        # One window, plus the one DATA frame (16 KiB) the first read took.
        assert receiver.data_received <= WINDOW + 16_384
        read_all.set()
        await sending
        await stream.end()
        await stream.recv_initial_metadata()
        await stream.recv_trailing_metadata()
    return got


async def test_recv_data_acknowledges_what_it_reads_and_only_that() -> None:
    """Data nobody read holds the sender at the HTTP/2 window; reading frees it."""
    total = 16 * WINDOW

    async def first(h2: grpclib.protocol.Stream) -> list[int]:
        return [len(await _seam.recv_data(h2, 5))]  # one read: one DATA frame acknowledged

    async def rest(h2: grpclib.protocol.Stream) -> list[int]:
        return [len(await _seam.recv_data(h2, total - 5))]

    assert await held_at_the_window(total, first, rest) == [5, total - 5]


# -- recv_some ------------------------------------------------------------------------


async def read_all_some(h2: grpclib.protocol.Stream, limit: int) -> list[list[bytes]]:
    """Every ``recv_some`` until the end of the stream, each checked against ``limit``."""
    reads = []
    while parts := await _seam.recv_some(h2, limit):
        assert 1 <= sum(map(len, parts)) <= limit
        reads.append(parts)
    return reads


async def test_recv_some_returns_what_arrived_in_order_within_the_limit() -> None:
    sent = [bytes([n]) * (n * 1000 + 1) for n in range(1, 8)]

    async def write(stream: Any, h2: grpclib.protocol.Stream) -> None:
        for data in sent:
            await h2.send_data(data)
        await stream.end()

    async def read(stream: grpclib.server.Stream[Any, Any]) -> object:
        return await read_all_some(h2_of(stream), 3000)

    reads = await read_on_server(write, read)
    assert isinstance(reads, list)
    assert b"".join(part for parts in reads for part in parts) == b"".join(sent)


async def test_recv_some_is_empty_at_the_end_of_the_stream() -> None:
    async def read(stream: grpclib.server.Stream[Any, Any]) -> object:
        h2 = h2_of(stream)
        return [await read_all_some(h2, 100), await _seam.recv_some(h2, 100)]

    assert await read_on_server(write_abc_and_end, read) == [[[b"a", b"bc"]], []]


async def test_recv_some_takes_at_most_one_data_frame_off_the_connection() -> None:
    """Data nobody read holds the sender at the HTTP/2 window, as with ``recv_data``."""
    total = 16 * WINDOW

    async def first(h2: grpclib.protocol.Stream) -> list[int]:
        return [sum(map(len, await _seam.recv_some(h2, 10)))]

    async def rest(h2: grpclib.protocol.Stream) -> list[int]:
        return [len(part) for parts in await read_all_some(h2, 1 << 20) for part in parts]

    got = await held_at_the_window(total, first, rest)
    assert got[0] == 10 and sum(got) == total


# -- receive_large_frames -------------------------------------------------------------


async def test_receive_large_frames_lets_the_peer_send_longer_data_frames() -> None:
    """grpclib's sender cuts DATA frames to what the receiver announced."""
    size = 64 * 1024
    first_read: list[int] = []

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        h2 = h2_of(stream)
        _seam.receive_large_frames(h2, size)
        _seam.receive_large_frames(h2, size)  # once is enough; again changes nothing
        assert h2.connection._connection.max_inbound_frame_size == size
        await stream.send_message(Message(payload=b"settings went out before this"))
        # Nothing was read before the client sent all: the first read takes
        # exactly the first DATA frame.
        first_read.append(sum(map(len, await _seam.recv_some(h2, 1 << 20))))
        rest = await read_all_some(h2, 1 << 20)
        first_read.append(first_read[0] + sum(len(p) for parts in rest for p in parts))
        await stream.send_trailing_metadata()

    async with asyncio.timeout(TIMEOUT), carrying_call(behave) as (stream, h2):
        assert await stream.recv_message() is not None  # after the peer's SETTINGS
        assert h2._h2_connection.max_outbound_frame_size == size
        await _seam.send_data(h2, b"\x01" * (3 * size))
        await stream.end()
        await stream.recv_trailing_metadata()
    assert first_read == [size, 3 * size]


# -- skip_data_frame_dumps ------------------------------------------------------------


async def test_skip_data_frame_dumps_spares_the_hex_dump_and_nothing_else(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Each received DATA frame is hex-dumped by h2 unless its connection skips it."""
    dumped: list[int] = []
    dump = hyperframe.frame._raw_data_repr

    def counting_dump(data: bytes | None) -> str:
        dumped.append(len(data or b""))
        return dump(data)

    monkeypatch.setattr(hyperframe.frame, "_raw_data_repr", counting_dump)
    payload = bytes(range(256)) * 234  # within the first HTTP/2 window

    async def transfer(skip: bool) -> list[int]:
        dumped.clear()
        received: list[bytes] = []

        async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
            h2 = h2_of(stream)
            if skip:
                _seam.skip_data_frame_dumps(h2)
                _seam.skip_data_frame_dumps(h2)  # wrapped once, however often
            await stream.send_initial_metadata()  # the client writes after this
            received.append(await _seam.recv_data(h2, len(payload)))
            await stream.send_trailing_metadata()

        async with asyncio.timeout(TIMEOUT), carrying_call(behave) as (stream, h2):
            await stream.recv_initial_metadata()
            await h2.send_data(payload)
            await stream.end()
            await stream.recv_trailing_metadata()
        assert received == [payload]
        return [n for n in dumped if n > 1000]  # not the small HEADERS frames

    assert sum(await transfer(skip=False)) == len(payload)  # each byte, once
    assert await transfer(skip=True) == []


def test_a_data_frame_not_dumped_is_the_same_frame() -> None:
    """The frames come out of h2's buffer as they were, but for their ``repr``."""
    sent = hyperframe.frame.DataFrame(1, b"\x00\x01" * 100, flags=["END_STREAM"])
    frames = h2.frame_buffer.FrameBuffer()
    frames.max_frame_size = 16_384
    wrapped = _seam._FramesNotDumped(frames)
    wrapped.add_data(sent.serialize())
    got = list(wrapped)
    assert len(got) == 1
    frame = got[0]
    assert type(frame) is hyperframe.frame.DataFrame
    assert (frame.stream_id, frame.data, frame.flags) == (1, sent.data, sent.flags)
    assert "0001" not in repr(frame) and "(data not shown)" in repr(frame)
    assert wrapped.max_frame_size == 16_384


# -- light_stream_events -------------------------------------------------------------


def event_types(h2: grpclib.protocol.Stream) -> dict[str, type]:
    return {name: type(getattr(h2, name)) for name in _seam._STREAM_EVENTS}


async def test_light_stream_events_carry_a_call_past_its_window_to_its_trailers() -> None:
    """Flags on both ends: the sender waits out the window on one, trailers end the call."""
    payload = bytes(range(256)) * (3 * WINDOW // 256 + 1)  # the sender waits for the window
    flags_on_server: list[dict[str, type]] = []

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        h2 = h2_of(stream)
        states = [getattr(h2, name).is_set() for name in _seam._STREAM_EVENTS]
        _seam.light_stream_events(h2)
        flags_on_server.append(event_types(h2))
        assert [getattr(h2, name).is_set() for name in _seam._STREAM_EVENTS] == states
        await stream.send_initial_metadata()
        await h2.send_data(payload)
        await stream.send_trailing_metadata()

    async with asyncio.timeout(TIMEOUT), carrying_call(behave, end=True) as (stream, h2):
        await stream.recv_initial_metadata()
        _seam.light_stream_events(h2)
        assert event_types(h2) == dict.fromkeys(_seam._STREAM_EVENTS, Flag)
        assert h2.headers_received.is_set() and not h2.trailers_received.is_set()
        received = b"".join(p for parts in await read_all_some(h2, WINDOW) for p in parts)
        await stream.recv_trailing_metadata()
        assert h2.trailers_received.is_set()
    assert flags_on_server == [dict.fromkeys(_seam._STREAM_EVENTS, Flag)]
    assert received == payload


async def test_light_stream_events_leave_an_event_a_task_waits_on() -> None:
    """A task waiting on an event when it would be replaced is still woken by grpclib."""
    answer = asyncio.Event()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        await answer.wait()
        await stream.send_initial_metadata()
        await stream.send_trailing_metadata()

    async with asyncio.timeout(TIMEOUT), carrying_call(behave, end=True) as (stream, h2):
        headers = asyncio.create_task(stream.recv_initial_metadata())
        while not h2.headers_received._waiters:  # bounded by the timeout above
            await asyncio.sleep(0)
        _seam.light_stream_events(h2)
        assert event_types(h2) == {
            "window_updated": Flag,
            "headers_received": asyncio.Event,
            "trailers_received": Flag,
        }
        answer.set()
        await headers
        await stream.recv_trailing_metadata()


# -- call_wrapper ---------------------------------------------------------------------


async def test_call_wrapper_wakes_a_client_read_when_the_connection_is_lost() -> None:
    reached = asyncio.Event()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        reached.set()
        await asyncio.Event().wait()  # never answers

    async with (
        asyncio.timeout(TIMEOUT),
        server(behave) as port,
        Proxy(port) as proxy,
        connected(proxy.port) as channel,
    ):
        with pytest.raises(StreamTerminatedError):
            async with call(channel) as stream:
                await stream.send_request()
                h2 = _seam.http2_stream(stream)
                assert h2 is not None
                await reached.wait()
                waiting = asyncio.Event()

                async def read() -> bytes:
                    with _seam.call_wrapper(stream):
                        waiting.set()
                        return await _seam.recv_data(h2, 5)

                reading = asyncio.create_task(read())
                await waiting.wait()  # the read is now blocked in the buffer
                proxy.cut()
                await reading
