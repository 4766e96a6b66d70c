"""A hostile client cannot make a tunnel server's memory grow without bound.

The server runs in a process of its own (``tests/field/peer.py``), so its
memory is measured as the operating system sees it: resident size before,
and the peak (``VmHWM``) after the flood.  The client is hand-made: it opens
``OpenTunnel`` with grpclib and writes frames without ever reading.

* a million streams opened at once: beyond ``max_concurrent_streams`` they
  are refused before any handler runs (without the limit: one handler task
  and its stream state each, measured at 664 MB for 100,000);
* and their refusals are never read: the server stops reading while its
  answers cannot leave, so the flood is slowed down to nothing through the
  carrying call's flow control once the HTTP/2 windows are full (without
  that: 820 MB of queued refusals for a million).

Meanwhile a tunnel on another connection is served as usual.
"""

from __future__ import annotations

import asyncio
import contextlib
from pathlib import Path

import grpclib.client
import pytest
from grpclib.const import Cardinality

import tunnel
from tests.field.test_processes import network_server, reached
from tests.reverse.support import who
from tunnel._pb.tunnel_pb2 import REVISION_ONE, ClientToServer, Metadata, NewStream, ServerToClient
from tunnel._wire import NEGOTIATE_HEADER, OPEN_TUNNEL

STREAMS = 1_000_000
#: How long the flood may write before it is stopped (it stalls much sooner).
FLOOD_FOR = 8.0
#: Peak growth allowed: a few MiB of HTTP/2 and tunnel buffers, not hundreds.
ALLOWED_GROWTH = 40 * 1024 * 1024


def memory_of(pid: int) -> tuple[int, int]:
    """(resident, peak resident) bytes of a process, from /proc."""
    fields = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            fields[key] = int(value.split()[0]) * 1024
    return fields["VmRSS"], fields["VmHWM"]


SERVED = "/grpchantesting.TestService/ServerStream"
UNKNOWN = "/nobody.Home/Nothing"


async def flood(port: int, sent: list[int], method: str = SERVED) -> None:
    """Open a tunnel by hand and start *STREAMS* streams of *method*, never reading."""
    channel = grpclib.client.Channel("127.0.0.1", port)
    try:
        async with channel.request(
            OPEN_TUNNEL,
            Cardinality.STREAM_STREAM,
            ClientToServer,
            ServerToClient,
            metadata={NEGOTIATE_HEADER: "on"},
        ) as stream:
            await stream.send_request()
            for stream_id in range(1, STREAMS + 1):
                await stream.send_message(
                    ClientToServer(
                        stream_id=stream_id,
                        new_stream=NewStream(
                            method_name=method,
                            request_headers=Metadata(),
                            initial_window_size=65_536,
                            protocol_revision=REVISION_ONE,
                        ),
                    )
                )
                sent[0] = stream_id
                if stream_id % 1000 == 0:
                    # Let the connection answer pings: a client the server
                    # cannot drop as dead, that just never reads.
                    await asyncio.sleep(0)
            await asyncio.Event().wait()  # never read, never end
    finally:
        channel.close()


@pytest.mark.parametrize("method", [SERVED, UNKNOWN], ids=["served", "unknown"])
async def test_a_flood_of_streams_that_never_reads_is_bounded(method: str) -> None:
    """Streams of a served method are refused beyond the limit; of an unknown
    one, refused at once; either way, the refusals are never read."""
    async with asyncio.timeout(60), network_server() as (server, port):
        resident_before, _ = memory_of(server.process.pid)
        sent = [0]
        flooding = asyncio.create_task(flood(port, sent, method))
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(FLOOD_FOR):
                await asyncio.shield(flooding)
        stalled_at = sent[0]
        # Another client, on its own connection, is served meanwhile.
        direct = grpclib.client.Channel("127.0.0.1", port)
        try:
            async with tunnel.open_tunnel(direct) as channel:
                assert await who(channel) == "server"
                blocked = await reached(channel)
                await blocked.aclose()
        finally:
            direct.close()
        _, peak = memory_of(server.process.pid)
        flooding.cancel()
        await asyncio.gather(flooding, return_exceptions=True)
    assert stalled_at < STREAMS, "the server kept reading a client that never reads"
    grown = peak - resident_before
    assert grown < ALLOWED_GROWTH, f"peak grew by {grown / 2**20:.1f} MiB"
