"""Hand-made peers: carrying calls whose bytes the test writes itself.

A hostile peer does not go through ``tunnel``: it opens ``OpenTunnel`` or
``OpenReverseTunnel`` as a plain grpclib call (or serves them with a plain
grpclib handler) and writes frames of its own making, down to the gRPC
prefix and the raw bytes of an oversized frame, through the same
``tunnel._seam`` functions the library uses to write batches.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpclib.client
import grpclib.server
from google.protobuf.message import Message
from grpclib.const import Cardinality, Handler
from grpclib.exceptions import GRPCError

from tunnel import _seam
from tunnel._core.framing import frame_prefix
from tunnel._pb.tunnel_pb2 import ClientToServer, ServerToClient

OPEN_TUNNEL = "/grpctunnel.v1.TunnelService/OpenTunnel"
OPEN_REVERSE_TUNNEL = "/grpctunnel.v1.TunnelService/OpenReverseTunnel"
NEGOTIATE = {"grpctunnel-negotiate": "on"}

MiB = 1024 * 1024

#: Both frame types number their ``more_*_data`` field 4 (bytes, wire type 2).
_MORE_DATA_TAG = b"\x22"


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        byte, n = n & 0x7F, n >> 7
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def big_frame_head(stream_id: int, data_size: int) -> bytes:
    """The gRPC prefix and first bytes of a frame ``more_*_data`` of ``data_size`` bytes.

    The rest of the frame is ``data_size`` bytes of anything: the whole is a
    well-formed ``ClientToServer``/``ServerToClient`` for whoever reads it all.
    """
    head = ClientToServer(stream_id=stream_id).SerializeToString()
    head += _MORE_DATA_TAG + _varint(data_size)
    return frame_prefix(len(head) + data_size) + head


async def write_raw(stream: Any, data: bytes) -> None:
    """Write bytes on a grpclib stream's HTTP/2 stream, bypassing its message framing."""
    h2 = _seam.http2_stream(stream)
    assert h2 is not None, "not a grpclib stream over HTTP/2"
    with _seam.call_wrapper(stream):
        await _seam.send_data(h2, data)


async def write_frame(stream: Any, frame: Message) -> None:
    data = frame.SerializeToString()
    await write_raw(stream, frame_prefix(len(data)) + data)


async def write_big_frame(stream: Any, data_size: int, *, stream_id: int = 1) -> None:
    """Write one frame of about ``data_size`` bytes, 1 MiB at a time.

    Returns when all of it is written; a peer that stops reading makes it
    wait (flow control), and a peer that resets the call ends it with
    ``StreamTerminatedError``.
    """
    await write_raw(stream, big_frame_head(stream_id, data_size))
    chunk = b"\x00" * MiB
    sent = 0
    while sent < data_size:
        piece = chunk if data_size - sent >= MiB else chunk[: data_size - sent]
        await write_raw(stream, piece)
        sent += len(piece)


@contextlib.asynccontextmanager
async def raw_call(
    channel: grpclib.client.Channel, method: str, *, negotiate: bool = True
) -> AsyncIterator[grpclib.client.Stream[Any, Any]]:
    """``OpenTunnel``/``OpenReverseTunnel`` as a bare grpclib call, request sent.

    The frame types are given as the ones ``OpenTunnel`` uses; nothing here
    encodes or decodes with them except ``recv_message``.
    """
    send, recv = (
        (ClientToServer, ServerToClient)
        if method == OPEN_TUNNEL
        else (ServerToClient, ClientToServer)
    )
    stream = channel.request(
        method, Cardinality.STREAM_STREAM, send, recv, metadata=NEGOTIATE if negotiate else None
    )
    async with stream:
        await stream.send_request()
        yield stream


async def call_status(
    channel: grpclib.client.Channel,
    method: str,
    attack: Callable[[grpclib.client.Stream[Any, Any]], Awaitable[None]],
    *,
    negotiate: bool = True,
) -> GRPCError | None:
    """Open a raw call, run ``attack`` on it, return the status it ended with.

    The server may end the call (trailers, then a reset) while the attack is
    still writing: grpclib then finds the status in the trailers it got.
    """
    try:
        async with raw_call(channel, method, negotiate=negotiate) as stream:
            await attack(stream)
            await stream.end()
            if stream.initial_metadata is None:
                await stream.recv_initial_metadata()
            await stream.recv_trailing_metadata()
    except GRPCError as exc:
        return exc
    return None


class RawTunnelServer:
    """Serves ``OpenTunnel`` and ``OpenReverseTunnel`` with a test's own coroutine.

    ``behave(stream)`` gets the grpclib server stream once the response
    headers (with the negotiate header) are out; ``ended`` is set when it
    returns or is cancelled.
    """

    def __init__(self, behave: Callable[[grpclib.server.Stream[Any, Any]], Awaitable[None]]):
        self._behave = behave
        self.ended = asyncio.Event()

    async def _handle(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        try:
            await stream.send_initial_metadata(metadata=NEGOTIATE)
            await self._behave(stream)
        finally:
            self.ended.set()

    def __mapping__(self) -> dict[str, Handler]:
        return {
            OPEN_TUNNEL: Handler(
                self._handle, Cardinality.STREAM_STREAM, ClientToServer, ServerToClient
            ),
            OPEN_REVERSE_TUNNEL: Handler(
                self._handle, Cardinality.STREAM_STREAM, ServerToClient, ClientToServer
            ),
        }
