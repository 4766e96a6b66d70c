"""Where the time of one unary call goes: cProfile, attributed by module.

Client and server share the event loop, so the profile holds both ends of
every call.  Each function's *own* time (``tottime``) goes to the bucket of
the file it is defined in; the buckets therefore add up to the whole
profiled time, with nothing counted twice (cumulative times nest and would).
C functions have no file, and stdlib helpers (enum, typing, ...) belong to
no layer: their time goes to the bucket of whoever called them, except
protobuf's (upb) encode and decode, which have a bucket of their own.  That
bucket holds the tunnel's frames and the application's messages together:
the carrying call's frames are decoded by grpclib's ProtoCodec like any
message, so the profile cannot tell them apart; :func:`frame_codec` times
the frames of one unary call on their own instead.  Constructing a upb
message is a call of a C type, which cProfile does not see: that time stays
with the Python function doing it.  The profiler roughly doubles the time of
a call, evenly enough across layers for the shares to be read; the absolute
microseconds are inflated.
"""

from __future__ import annotations

import asyncio
import cProfile
import pstats
import time
from pathlib import Path
from typing import Any

from .workloads import BULK_PAYLOAD, UNARY_PAYLOAD, Client, echo_bulk

ROOT = Path(__file__).resolve().parent.parent
_TUNNEL = str(ROOT / "tunnel") + "/"
_CORE = str(ROOT / "tunnel" / "_core") + "/"
_HARNESS = str(ROOT / "benchmarks") + "/"

BUCKETS = (
    "protobuf codec (upb)",
    "tunnel/_core",
    "tunnel adapter",
    "grpclib + h2",
    "asyncio + sockets",
    "benchmark harness",
    "other",  # stdlib helpers called from stdlib helpers, and the like
)

_GRPCLIB_PARTS = ("/grpclib/", "/h2/", "/hpack/", "/hyperframe/", "/multidict/")
_ASYNCIO_PARTS = ("/asyncio/", "/selectors.py", "/socket.py", "/uvloop/", "/contextvars")


def _bucket_of_file(filename: str) -> str:
    if filename.startswith(_CORE):
        return "tunnel/_core"
    if filename.startswith(_TUNNEL + "_pb/"):
        return "protobuf codec (upb)"
    if filename.startswith(_TUNNEL):
        return "tunnel adapter"
    if filename.startswith(_HARNESS):
        return "benchmark harness"
    if any(part in filename for part in _GRPCLIB_PARTS):
        return "grpclib + h2"
    if "/google/protobuf/" in filename:
        return "protobuf codec (upb)"
    if any(part in filename for part in _ASYNCIO_PARTS):
        return "asyncio + sockets"
    return "other"


#: Chunks of one 1 MiB message: the tunnel cuts messages into 16 KiB chunks,
#: and direct grpclib sends 16 KiB HTTP/2 DATA frames (h2's default
#: SETTINGS_MAX_FRAME_SIZE), so the unit is the same for every transport.
CHUNK = 16_384
CHUNKS_PER_MESSAGE = len(BULK_PAYLOAD) // CHUNK

#: Built-in calls that copy bytes, for the census of copies in
#: :func:`profile_bulk`.  Copies made by operators and constructors
#: (``bytes(view)``, slicing, ``bytearray +=``) are invisible to cProfile.
_COPYING = {
    "<method 'join' of 'bytes' objects>": "bytes.join",
    "<method 'SerializeToString' of 'google._upb._message.Message' objects>": "upb encode",
    "<built-in method FromString>": "upb decode",
    "<method 'tobytes' of 'memoryview' objects>": "memoryview.tobytes",
    "<built-in method binascii.hexlify>": "hexlify",
    "<method 'read' of '_io.BytesIO' objects>": "BytesIO.read",
    "<method 'send' of '_socket.socket' objects>": "socket.send",
    "<method 'recv' of '_socket.socket' objects>": "socket.recv",
}


def _is_upb(name: str) -> bool:
    return "_upb" in name or "FromString" in name or "SerializeToString" in name


def attribute(stats: dict[Any, Any]) -> dict[str, float]:
    """Seconds of own time per bucket, from ``pstats.Stats(...).stats``."""
    totals = dict.fromkeys(BUCKETS, 0.0)
    for (filename, _line, name), (_cc, _nc, tottime, _ct, callers) in stats.items():
        own = _bucket_of_file(filename) if filename != "~" else "other"
        if own != "other" or not callers:
            totals[own] += tottime
            continue
        # C functions and stdlib helpers (enum, typing, ...): the caller's bucket.
        for (caller_file, _l, _n), edge in callers.items():
            edge_tottime = edge[2]
            caller_bucket = _bucket_of_file(caller_file) if caller_file != "~" else "other"
            if filename == "~" and _is_upb(name):
                caller_bucket = "protobuf codec (upb)"
            totals[caller_bucket] += edge_tottime
    return totals


def _short(filename: str) -> str:
    """A file's name relative to the checkout, site-packages or the standard library."""
    if filename.startswith(str(ROOT)) and "site-packages/" not in filename:
        return filename[len(str(ROOT)) + 1 :]
    for marker in ("site-packages/", "/lib/python3."):
        if marker in filename:
            tail = filename.split(marker, 1)[1]
            return tail if marker == "site-packages/" else tail.split("/", 1)[1]
    return filename


def frame_codec(repeat: int = 2000) -> dict[str, float]:
    """µs to encode and decode the six grpctunnel.v1 frames of one unary call."""
    from google.protobuf import empty_pb2
    from google.rpc import status_pb2

    from tunnel._pb import tunnel_pb2 as t

    def md(**values: str) -> t.Metadata:
        return t.Metadata(md={k: t.Metadata.Values(val=[v]) for k, v in values.items()})

    data = b"\n\x10" + UNARY_PAYLOAD

    def one_call() -> None:
        frames: list[Any] = [
            t.ClientToServer(
                stream_id=1,
                new_stream=t.NewStream(
                    method_name="/grpchantesting.TestService/Unary",
                    request_headers=md(),
                    initial_window_size=65536,
                    protocol_revision=t.REVISION_ONE,
                ),
            ),
            t.ClientToServer(stream_id=1, request_message=t.MessageData(size=len(data), data=data)),
            t.ClientToServer(stream_id=1, half_close=empty_pb2.Empty()),
            t.ServerToClient(stream_id=1, response_headers=md()),
            t.ServerToClient(
                stream_id=1, response_message=t.MessageData(size=len(data), data=data)
            ),
            t.ServerToClient(
                stream_id=1, close_stream=t.CloseStream(status=status_pb2.Status(code=0))
            ),
        ]
        for frame in frames:
            decoded = type(frame).FromString(frame.SerializeToString())
            decoded.WhichOneof("frame")

    one_call()
    start = time.perf_counter()
    for _ in range(repeat):
        one_call()
    return {"frames": 6, "us_per_call": (time.perf_counter() - start) / repeat * 1e6}


async def profile_unary(client: Client, calls: int) -> dict[str, Any]:
    """Profile *calls* sequential unary calls; µs per call by bucket, and hot spots."""
    for _ in range(50):
        await client.unary(UNARY_PAYLOAD)
    start = time.perf_counter()
    for _ in range(calls):
        await client.unary(UNARY_PAYLOAD)
    plain = (time.perf_counter() - start) / calls
    await asyncio.sleep(0)

    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        await client.unary(UNARY_PAYLOAD)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    buckets = attribute(stats)
    profiled = sum(buckets.values())
    hot: list[dict[str, Any]] = []
    for (filename, line, name), (_cc, nc, tottime, cumtime, _callers) in stats.items():
        if filename.startswith(_TUNNEL):
            hot.append(
                {
                    "function": f"{_short(filename)}:{line}({name})",
                    "calls_per_call": nc / calls,
                    "own_us": tottime / calls * 1e6,
                    "cumulative_us": cumtime / calls * 1e6,
                }
            )
    hot.sort(key=lambda h: h["own_us"], reverse=True)
    return {
        "calls": calls,
        "frame_codec": frame_codec(),
        "unprofiled_us_per_call": plain * 1e6,
        "profiled_us_per_call": profiled / calls * 1e6,
        "buckets_us_per_call": {k: v / calls * 1e6 for k, v in buckets.items()},
        "tunnel_hot_spots": hot[:15],
    }


def _h2_repr(stats: dict[Any, Any]) -> float:
    """Seconds h2 spent on ``repr`` of the frames it received (cumulative).

    h2's ``H2Connection._receive_frame`` logs ``repr(frame)`` at trace level
    for every frame, computed even though grpclib's logger discards it, and
    hyperframe's repr of a DATA frame hexlifies the whole payload.
    """
    return sum(
        cumtime
        for (filename, _line, name), (_cc, _nc, _tt, cumtime, _callers) in stats.items()
        if name == "__repr__" and filename.endswith("hyperframe/frame.py")
    )


def _copies(stats: dict[Any, Any], units: int) -> list[dict[str, Any]]:
    """Calls of copying built-ins per chunk, by the function that made them."""
    rows: list[dict[str, Any]] = []
    for (filename, _line, name), (_cc, _nc, _tt, _ct, callers) in stats.items():
        if filename != "~" or name not in _COPYING:
            continue
        for (caller_file, line, caller), edge in callers.items():
            calls = edge[1]
            if calls / units < 0.25:
                continue
            rows.append(
                {
                    "copy": _COPYING[name],
                    "by": f"{_short(caller_file)}:{line}({caller})",
                    "layer": _bucket_of_file(caller_file),
                    "calls_per_chunk": calls / units,
                    "own_us_per_chunk": edge[2] / units * 1e6,
                }
            )
    rows.sort(key=lambda r: (r["layer"], -r["calls_per_chunk"]))
    return rows


async def profile_bulk(client: Client, messages: int) -> dict[str, Any]:
    """Profile *messages* 1 MiB messages echoed; µs per 16 KiB chunk by bucket.

    Each message crosses the connection once each way, so the unit is one
    16 KiB chunk crossing once: the figures are per ``messages * 2 *
    CHUNKS_PER_MESSAGE`` chunks.  Besides the buckets: the part of grpclib +
    h2 that is h2's ``repr`` of received frames, and a census of the
    built-in calls that copy bytes, per chunk.
    """
    units = messages * 2 * CHUNKS_PER_MESSAGE
    await echo_bulk(client, 2)
    plain = await echo_bulk(client, messages)
    await asyncio.sleep(0)

    profiler = cProfile.Profile()
    profiler.enable()
    await echo_bulk(client, messages)
    profiler.disable()
    stats = pstats.Stats(profiler).stats  # type: ignore[attr-defined]

    buckets = attribute(stats)
    profiled = sum(buckets.values())
    return {
        "messages": messages,
        "chunks": units,
        "unprofiled_us_per_chunk": plain / units * 1e6,
        "profiled_us_per_chunk": profiled / units * 1e6,
        "buckets_us_per_chunk": {k: v / units * 1e6 for k, v in buckets.items()},
        "h2_repr_us_per_chunk": _h2_repr(stats) / units * 1e6,
        "copies": _copies(stats, units),
    }
