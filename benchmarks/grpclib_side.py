"""Direct grpclib and our forward and reverse tunnels, as workload clients.

One grpclib server on 127.0.0.1 serves the benchmark service directly and,
through a ``TunnelServiceHandler``, inside forward tunnels; the same handler
accepts reverse tunnels.  The listening socket is created with IPPROTO_TCP so
that asyncio sets TCP_NODELAY on accepted connections (GRPCLIB-NOTES 11).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import socket
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpclib.client
import grpclib.server
from grpclib.const import Cardinality, Handler

import tunnel

from . import workloads
from .workloads import LIVE, Opener

SERVICE = "/grpchantesting.TestService/"
KINDS = ("direct", "forward", "reverse", "forward-wide")

#: ``forward-wide``: a forward tunnel whose ends both grant 1 MiB windows
#: (``TunnelOptions.initial_window_size``) instead of the reference's 64 KiB.
WIDE = tunnel.TunnelOptions(initial_window_size=1024 * 1024)

#: Reverse tunnels register under a key of their own, so that opening one can
#: wait for exactly that tunnel to be in the handler's pool.
_BENCH_KEY = "bench-tunnel"
_tunnel_ids = itertools.count()


def _bench_key(channel: tunnel.TunnelChannel) -> object:
    return channel.metadata.get(_BENCH_KEY)


#: Seconds to wait for a tunnel to come up or go down.
TIMEOUT = 30.0


class BenchService:
    """``grpchantesting.TestService``'s Unary, ServerStream and BidiStream, minimal."""

    def __init__(self, pb: ModuleType) -> None:
        self._message = pb.Message

    def __mapping__(self) -> Mapping[str, Handler]:
        m = self._message
        return {
            SERVICE + "Unary": Handler(self._unary, Cardinality.UNARY_UNARY, m, m),
            SERVICE + "ServerStream": Handler(self._server_stream, Cardinality.UNARY_STREAM, m, m),
            SERVICE + "BidiStream": Handler(self._bidi, Cardinality.STREAM_STREAM, m, m),
        }

    async def _unary(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        await stream.send_message(request)

    async def _server_stream(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        request = await stream.recv_message()
        assert request is not None
        reply = self._message(payload=request.payload)
        for _ in range(request.count):
            await stream.send_message(reply)

    async def _bidi(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        LIVE.enter()
        try:
            async for request in stream:
                await stream.send_message(request)
        finally:
            LIVE.exit()


class _Bidi:
    def __init__(self, stream: grpclib.client.Stream[Any, Any], message: type) -> None:
        self._stream = stream
        self._message = message

    async def send(self, payload: bytes) -> None:
        await self._stream.send_message(self._message(payload=payload))

    async def recv(self) -> bytes:
        reply = await self._stream.recv_message()
        if reply is None:
            raise AssertionError("BidiStream ended early")
        payload: bytes = reply.payload
        return payload


class GrpclibClient:
    """:class:`workloads.Client` over any grpclib Channel (plain or tunnel)."""

    def __init__(
        self,
        channel: grpclib.client.Channel,
        pb: ModuleType,
        metadata: Mapping[str, str] | None = None,
    ) -> None:
        #: Sent with every call (the router's key header, say).
        self._metadata = dict(metadata) if metadata else None
        m = self._message = pb.Message
        self._unary = grpclib.client.UnaryUnaryMethod(channel, SERVICE + "Unary", m, m)
        self._stream = grpclib.client.UnaryStreamMethod(channel, SERVICE + "ServerStream", m, m)
        self._bidi = grpclib.client.StreamStreamMethod(channel, SERVICE + "BidiStream", m, m)

    async def unary(self, payload: bytes) -> None:
        await self._unary(self._message(payload=payload), metadata=self._metadata)

    async def server_stream(self, count: int, payload: bytes) -> int:
        received = 0
        async with self._stream.open(metadata=self._metadata) as stream:
            await stream.send_message(self._message(payload=payload, count=count), end=True)
            async for _ in stream:
                received += 1
        return received

    @contextlib.asynccontextmanager
    async def bidi(self) -> AsyncIterator[_Bidi]:
        async with self._bidi.open(metadata=self._metadata) as stream:
            await stream.send_request()
            yield _Bidi(stream, self._message)
            await stream.end()
            async for _ in stream:
                raise AssertionError("unexpected BidiStream reply")


def _listening_socket() -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


@contextlib.asynccontextmanager
async def _reverse_tunnel(
    channel: grpclib.client.Channel, services: list[Any], handler: tunnel.TunnelServiceHandler
) -> AsyncIterator[None]:
    """One reverse tunnel over *channel*, registered with *handler* when entered."""
    device = tunnel.ReverseTunnelServer(channel, services)
    key = str(next(_tunnel_ids))
    serving = asyncio.ensure_future(device.serve({_BENCH_KEY: key}))
    try:
        await _registered(serving, handler.key_as_channel(key))
        yield
    finally:
        device.close()
        async with asyncio.timeout(TIMEOUT):
            await asyncio.gather(serving, return_exceptions=True)


async def _registered(serving: asyncio.Future[None], pool: tunnel.ReverseChannel) -> None:
    """Return once *pool* has the tunnel *serving* opens; raise if it ended first.

    Nothing of this wait outlives it: a finished task kept by the held
    context manager would count in the idle tunnel's figure (0.7 KiB).
    """
    ready = asyncio.ensure_future(pool.wait_ready())
    try:
        async with asyncio.timeout(TIMEOUT):
            await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        ready.cancel()
    if serving.done():
        serving.result()
        raise AssertionError("reverse tunnel ended before it was ready")


@dataclass
class Setup:
    client: GrpclibClient
    #: For :func:`workloads.idle_tunnels`.
    connect: Any
    #: The channel the client calls through (for the profile's description).
    channel: grpclib.client.Channel


@contextlib.asynccontextmanager
async def transport(kind: str, pb: ModuleType, service: Any = None) -> AsyncIterator[Setup]:
    """A server and a :class:`GrpclibClient` of *kind* (direct, forward, reverse).

    The server serves :class:`BenchService`, or *service* instead (the
    SendRPCs mix runs against ``tunnel.testing``'s ``TestService``).
    """
    if service is None:
        service = BenchService(pb)
    handler = tunnel.TunnelServiceHandler(
        [service],
        affinity_key=_bench_key,
        options=WIDE if kind == "forward-wide" else None,
    )
    server = grpclib.server.Server([service, handler])
    sock = _listening_socket()
    port = sock.getsockname()[1]
    await server.start(sock=sock)
    async with contextlib.AsyncExitStack() as stack:

        async def stop_server() -> None:
            server.close()
            async with asyncio.timeout(TIMEOUT):
                await server.wait_closed()

        stack.push_async_callback(stop_server)
        network = grpclib.client.Channel("127.0.0.1", port)
        stack.callback(network.close)
        channel: grpclib.client.Channel
        if kind == "direct":
            channel = network
        elif kind == "forward":
            channel = await stack.enter_async_context(tunnel.open_tunnel(network))
        elif kind == "forward-wide":
            channel = await stack.enter_async_context(tunnel.open_tunnel(network, options=WIDE))
        elif kind == "reverse":
            await stack.enter_async_context(_reverse_tunnel(network, [service], handler))
            channel = handler.as_channel()
        else:
            raise ValueError(f"unknown grpclib transport {kind!r}")

        @contextlib.asynccontextmanager
        async def connect(connections: int) -> AsyncIterator[Opener]:
            channels = [grpclib.client.Channel("127.0.0.1", port) for _ in range(connections)]
            try:
                clients = [GrpclibClient(ch, pb) for ch in channels]
                for client in clients:  # connect and warm up every connection
                    await client.unary(b"")
                turn = itertools.cycle(zip(channels, clients, strict=True))

                def open_one() -> contextlib.AbstractAsyncContextManager[Any]:
                    ch, client = next(turn)
                    if kind == "direct":
                        return workloads.held_stream(client)
                    if kind == "forward":
                        return tunnel.open_tunnel(ch)
                    return _reverse_tunnel(ch, [service], handler)

                yield open_one
            finally:
                for ch in channels:
                    ch.close()

        yield Setup(GrpclibClient(channel, pb), connect, channel)


async def mix(kind: str, pb: ModuleType, seconds: float) -> dict[str, float]:
    """The reference's SendRPCs load for *seconds*: completed calls/s of each kind.

    ``tunnel.testing``'s ``send_rpcs`` (the load jhump/grpctunnel's interop
    programs put on every tunnel: unary calls of 400 bytes, client streams
    of 10 x 40 KB, server and bidi streams of 10 x 4 KB, four loops at once
    on one channel) against ``tunnel.testing``'s ``TestService``, over this
    transport.  Each loop finishes the call it is in when the time is up, so
    every call counted completed; rates are over the whole time, those last
    calls included.  The messages are betterproto's (as in the reference's
    load), the same for every transport.
    """
    from tunnel.testing._load import send_rpcs
    from tunnel.testing.service import TestService

    async with transport(kind, pb, TestService()) as setup:
        await send_rpcs(setup.channel, duration=min(0.5, seconds / 4))  # warm-up
        start = time.perf_counter()
        stats = await send_rpcs(setup.channel, duration=seconds)
        elapsed = time.perf_counter() - start
    rates = {f"{call}_per_s": count / elapsed for call, count in stats.calls.items()}
    return {**rates, "calls_per_s": stats.total / elapsed, "seconds": elapsed}
