"""The carrier reads frames as they arrived, however their bytes were cut.

``StreamCarrier.recv`` reads what has arrived of the carrying call's HTTP/2
stream at once and parses every whole frame in it: frames that share a DATA
frame come out one by one, in order; a frame cut across DATA frames (even
inside its 5-byte prefix) waits for the rest; and a frame that breaks the
rules ends the tunnel only after the frames before it were handed out.  The
client side here is a plain grpclib call writing the bytes by hand, the
server side a ``StreamCarrier`` over grpclib's server stream.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.server
import pytest

from tests.integration.hostile import OPEN_TUNNEL, RawTunnelServer, raw_call, write_raw
from tests.integration.support import TEST_TIMEOUT, connected, serving
from tunnel._carrier import StreamCarrier
from tunnel._core.framing import frame_prefix
from tunnel._pb.tunnel_pb2 import ClientToServer, MessageData, ServerToClient
from tunnel.errors import FrameTooLarge, RemoteProtocolError

LIMIT = 200_000


def framed(frame: ClientToServer) -> bytes:
    data = frame.SerializeToString()
    return frame_prefix(len(data)) + data


def chunk(stream_id: int, size: int) -> ClientToServer:
    return ClientToServer(stream_id=stream_id, more_request_data=bytes([stream_id]) * size)


async def read_frames(writes: list[bytes]) -> tuple[list[ClientToServer], Exception | None]:
    """What a server's carrier reads when a client writes ``writes``, one by one."""
    frames: list[ClientToServer] = []
    outcome: asyncio.Future[Exception | None] = asyncio.get_running_loop().create_future()

    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        carrier = StreamCarrier[ServerToClient, ClientToServer](
            stream, ClientToServer, max_frame_size=LIMIT
        )
        try:
            while (frame := await carrier.recv()) is not None:
                frames.append(frame)
        except RemoteProtocolError as exc:
            outcome.set_result(exc)
        else:
            outcome.set_result(None)

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([RawTunnelServer(behave)]) as served,
        connected(served.port) as channel,
        raw_call(channel, OPEN_TUNNEL) as stream,
    ):
        await stream.recv_initial_metadata()
        for data in writes:
            await write_raw(stream, data)
        await stream.end()
        error = await outcome
        await stream.recv_trailing_metadata()
    return frames, error


async def test_frames_come_out_whole_and_in_order_however_they_were_cut() -> None:
    sent = [chunk(n, size) for n, size in enumerate([0, 1, 100, 16_384, 70_000, 3, 16_384], 1)]
    sent.append(ClientToServer(stream_id=9, request_message=MessageData(size=5, data=b"hello")))
    wire = b"".join(framed(frame) for frame in sent)
    first, second, third = framed(sent[0]), framed(sent[1]), framed(sent[2])
    writes = [
        first + second[:3],  # a frame and the start of the next one's prefix
        second[3:] + third[:-1],  # the rest of it, and all but a byte of the third
        wire[len(first) + len(second) + len(third) - 1 :],  # all the others at once
    ]
    assert b"".join(writes) == wire

    frames, error = await read_frames(writes)

    assert error is None
    assert frames == sent


async def test_a_frame_that_does_not_parse_ends_the_tunnel_after_the_frames_before_it() -> None:
    good = [chunk(1, 10), chunk(2, 20)]
    bad = frame_prefix(3) + b"\xff\xff\xff"
    writes = [b"".join(framed(frame) for frame in good) + bad + framed(chunk(3, 30))]

    frames, error = await read_frames(writes)

    assert frames == good
    assert isinstance(error, RemoteProtocolError)
    assert "undecodable frame" in str(error)


async def test_a_frame_over_the_bound_ends_the_tunnel_after_the_frames_before_it() -> None:
    good = chunk(1, 10)
    writes = [framed(good) + frame_prefix(LIMIT + 1) + b"\x00" * 1000]

    frames, error = await read_frames(writes)

    assert frames == [good]
    assert isinstance(error, FrameTooLarge)


@pytest.mark.parametrize("cut", [2, 5, 9], ids=["in-prefix", "after-prefix", "in-body"])
async def test_a_call_that_ends_within_a_frame_ends_the_tunnel(cut: int) -> None:
    good = chunk(1, 10)
    writes = [framed(good) + framed(chunk(2, 20))[:cut]]

    frames, error = await read_frames(writes)

    assert frames == [good]
    assert isinstance(error, RemoteProtocolError)
    assert "ended in the middle of a frame" in str(error)
