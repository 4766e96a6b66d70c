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

from .workloads import UNARY_PAYLOAD, Client

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
    return filename[len(str(ROOT)) + 1 :] if filename.startswith(str(ROOT)) else filename


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
