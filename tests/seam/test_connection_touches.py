"""What ``tunnel._seam`` assumes of grpclib's connections, checked on the real thing.

``connection_is_lost``, ``abort_connection``, ``http2_pinger`` and
``http2_stream_limit_reached`` reach a call's connection through grpclib's
private attributes; each test here pins one of them on a real grpclib
server and client over loopback.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpclib.client
import grpclib.server
from grpclib.exceptions import StreamTerminatedError

from tests.integration.support import Proxy, connected
from tests.seam.test_carrying_streams import TIMEOUT, call, server
from tunnel import _seam


async def test_connection_is_lost_tells_a_lost_connection_from_an_open_one() -> None:
    states: list[bool] = []
    cancelled = asyncio.Event()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        states.append(_seam.connection_is_lost(stream))
        try:
            await stream.recv_message()
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            states.append(_seam.connection_is_lost(stream))
            cancelled.set()
            raise

    async with asyncio.timeout(TIMEOUT), server(behave) as port:
        channel = grpclib.client.Channel("127.0.0.1", port)
        try:
            stream = call(channel)
            await stream.__aenter__()
            await stream.send_request()
            await stream.send_message(_message())
            while not states:
                await asyncio.sleep(0.01)
            channel.close()
            await cancelled.wait()
        finally:
            channel.close()
    assert states == [False, True]
    assert _seam.connection_is_lost(object()) is False


async def test_abort_connection_cuts_it_and_the_channel_dials_anew() -> None:
    cancelled = asyncio.Event()
    peers: list[object] = []

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        peers.append(stream.peer.addr() if stream.peer else None)
        try:
            async for message in stream:
                await stream.send_message(message)
        except asyncio.CancelledError:
            cancelled.set()
            raise

    async with asyncio.timeout(TIMEOUT), server(behave) as port, connected(port) as channel:
        first = call(channel)
        await first.__aenter__()
        await first.send_message(_message())
        assert await first.recv_message() is not None
        _seam.abort_connection(first)
        await cancelled.wait()  # the server saw the connection go
        lost = StreamTerminatedError("aborted")
        with contextlib.suppress(StreamTerminatedError):
            await first.__aexit__(StreamTerminatedError, lost, None)
        async with call(channel) as second:
            await second.send_message(_message(), end=True)
            assert await second.recv_message() is not None
        assert len(peers) == 2 and peers[0] != peers[1]  # a new connection


async def test_http2_pinger_is_answered_by_a_live_peer_and_not_by_a_silent_one() -> None:
    pingers: asyncio.Queue[Any] = asyncio.Queue()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        await pingers.put(_seam.http2_pinger(stream))
        await stream.recv_message()
        await asyncio.Event().wait()

    async with (
        asyncio.timeout(TIMEOUT),
        server(behave) as port,
        Proxy(port) as proxy,
        connected(proxy.port) as channel,
        call(channel) as stream,
    ):
        await stream.send_message(_message())
        ping = await pingers.get()
        assert ping is not None
        for _ in range(3):
            async with asyncio.timeout(2):
                await ping()  # answered: the client's h2 acknowledges PINGs
        proxy.freeze()
        answered = asyncio.ensure_future(ping())
        done, _ = await asyncio.wait({answered}, timeout=0.5)
        assert not done  # a silent peer does not answer
        proxy.thaw()
        async with asyncio.timeout(2):
            await answered  # and an answer that comes late still counts
        await stream.cancel()
    assert _seam.http2_pinger(object()) is None


async def test_http2_stream_limit_reached_names_the_limit_when_it_is_reached() -> None:
    started = asyncio.Event()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        started.set()
        await stream.recv_message()
        await asyncio.Event().wait()

    async with asyncio.timeout(TIMEOUT), server(behave) as port, connected(port) as channel:
        assert _seam.http2_stream_limit_reached(channel) is None  # no connection yet
        streams = [call(channel) for _ in range(100)]
        await streams[0].__aenter__()
        await streams[0].send_request()
        await started.wait()  # a round trip: the server's SETTINGS arrived
        for stream in streams[1:]:
            await stream.__aenter__()
            await stream.send_request()
        assert _seam.http2_stream_limit_reached(channel) == 100
        await streams[0].cancel()
        assert _seam.http2_stream_limit_reached(channel) is None
        for stream in streams[1:]:
            await stream.cancel()
    assert _seam.http2_stream_limit_reached(object()) is None


def _message() -> Any:
    from tunnel.testing._pb.grpchantesting import Message

    return Message(payload=b"x")
