"""Writes of one event-loop iteration sent as one (``tunnel._coalesce``, ``_seam.coalesce_writes``).

The transport itself is tested against a recording transport; the seam's
assumptions (grpclib makes every connection with ``_protocol_factory`` and
uses only the transport's public API) on a real grpclib server and client.
"""

from __future__ import annotations

import asyncio
from typing import Any

import grpclib.client
import grpclib.config
import grpclib.server
from grpclib.health.service import Health
from grpclib.health.v1.health_grpc import HealthStub
from grpclib.health.v1.health_pb2 import HealthCheckRequest, HealthCheckResponse

from tests.conftest import _listening_socket
from tunnel import _seam
from tunnel._coalesce import FLUSH_AT, CoalescingTransport
from tunnel.testing import service
from tunnel.testing._pb import grpchantesting as bp

TIMEOUT = 10.0


class Recording(asyncio.Transport):
    """A transport that records what reaches it."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []
        self.closed = False
        self.aborted = False

    def write(self, data: Any) -> None:
        self.writes.append(bytes(data))

    def close(self) -> None:
        self.closed = True

    def abort(self) -> None:
        self.aborted = True

    def is_closing(self) -> bool:
        return self.closed or self.aborted

    def get_write_buffer_size(self) -> int:
        return 0

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return {"peername": ("127.0.0.1", 4242)}.get(name, default)


async def test_the_writes_of_one_iteration_leave_as_one_write() -> None:
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"headers")
    transport.write(b"")
    transport.write(b"message")
    transport.write(b"trailers")
    assert real.writes == []
    assert transport.get_write_buffer_size() == len(b"headersmessagetrailers")
    await asyncio.sleep(0)
    assert real.writes == [b"headersmessagetrailers"]


async def test_writes_of_later_iterations_leave_in_order_each_on_its_own() -> None:
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"first")
    await asyncio.sleep(0)
    transport.write(b"second")
    await asyncio.sleep(0)
    await asyncio.sleep(0)
    assert real.writes == [b"first", b"second"]


async def test_a_buffer_full_of_pending_data_is_written_at_once() -> None:
    """The real transport sees the data (and can push back) as soon as it would fill its buffer."""
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"a" * (FLUSH_AT - 1))
    assert real.writes == []
    transport.write(b"b")
    assert real.writes == [b"a" * (FLUSH_AT - 1) + b"b"]
    transport.write(b"c")
    await asyncio.sleep(0)
    assert real.writes[1:] == [b"c"]


async def test_close_sends_what_is_pending_first() -> None:
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"goaway")
    transport.close()
    assert (real.writes, real.closed, transport.is_closing()) == ([b"goaway"], True, True)
    await asyncio.sleep(0)
    assert real.writes == [b"goaway"]


async def test_abort_drops_what_is_pending() -> None:
    real = Recording()
    transport = CoalescingTransport(real)
    transport.write(b"never")
    transport.abort()
    await asyncio.sleep(0)
    assert (real.writes, real.aborted) == ([], True)


async def test_extra_info_is_the_real_transports() -> None:
    transport = CoalescingTransport(Recording())
    assert transport.get_extra_info("peername") == ("127.0.0.1", 4242)
    assert transport.get_extra_info("socket", "none") == "none"


async def test_grpclib_connections_made_after_coalesce_writes_use_it_and_serve_calls() -> None:
    """Server and channel: every connection carries the coalescing transport, calls work.

    Small HTTP/2 windows and 1 MiB messages each way: grpclib's flow
    control (waiting for window updates, which also go out coalesced) and
    the transport's own back-pressure still hold.
    """
    small = grpclib.config.Configuration(
        http2_connection_window_size=65_535, http2_stream_window_size=65_535
    )
    server = grpclib.server.Server([Health(), service.TestService()], config=small)
    _seam.coalesce_writes(server)
    connections = _seam.record_connections(server)
    sock = _listening_socket()
    await server.start(sock=sock)
    channel = grpclib.client.Channel("127.0.0.1", sock.getsockname()[1], config=small)
    _seam.coalesce_writes(channel)
    try:
        async with asyncio.timeout(TIMEOUT):
            reply = await HealthStub(channel).Check(HealthCheckRequest())
            assert reply.status == HealthCheckResponse.SERVING
            payload = bytes(range(256)) * 4096  # 1 MiB
            requests = [bp.Message(payload=payload) for _ in range(3)]
            echoed = [m async for m in bp.TestServiceStub(channel).bidi_stream(requests)]
            assert [m.payload for m in echoed] == [payload] * 3
        assert channel._protocol is not None
        assert isinstance(channel._protocol.connection._transport, CoalescingTransport)
        (protocol,) = list(connections)
        assert isinstance(protocol.connection._transport, CoalescingTransport)
    finally:
        channel.close()
        server.close()
        async with asyncio.timeout(TIMEOUT):
            await server.wait_closed()
