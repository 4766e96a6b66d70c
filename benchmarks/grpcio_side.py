"""Direct grpcio.aio and grpctunnel-py's forward and reverse tunnels.

Imported only in child processes for these transports: grpctunnel-py
registers ``grpctunnel/v1/tunnel.proto`` in protobuf's default descriptor
pool, as ours does, and grpcio starts threads of its own.

grpctunnel-py dispatches tunneled calls to handlers registered with
``register_method`` (raw request bytes in; a message or bytes out), so the
benchmark service is registered that way, decoding and encoding messages as
a generated servicer would.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import grpc
import grpc.aio

from . import workloads
from .workloads import LIVE, Opener

KINDS = ("grpcio", "gt-forward", "gt-reverse")
SERVICE = "grpchantesting.TestService/"
TIMEOUT = 30.0
#: Without it, grpcio channels with equal arguments share one connection.
_OWN_CONNECTION = [("grpc.use_local_subchannel_pool", 1)]


def available(kind: str) -> str | None:
    """None if *kind* can run here, else why not."""
    if kind.startswith("gt-"):
        try:
            import grpctunnel  # noqa: F401
        except ImportError:
            return "grpctunnel-py is not installed (pip install grpctunnel-py)"
    return None


async def _maybe_await(call: Any) -> Any:
    # grpctunnel-py's multi-callables are coroutine functions returning the
    # call object; grpcio's return the call object itself.
    if asyncio.iscoroutine(call):
        return await call
    return call


class _Bidi:
    def __init__(self, call: Any, message: type) -> None:
        self._call = call
        self._message = message

    async def send(self, payload: bytes) -> None:
        await self._call.write(self._message(payload=payload))

    async def recv(self) -> bytes:
        reply = await self._call.read()
        if reply is None or reply is grpc.aio.EOF:
            raise AssertionError("BidiStream ended early")
        payload: bytes = reply.payload
        return payload


class GrpcioClient:
    """:class:`workloads.Client` over a grpcio-style channel's generated stub."""

    def __init__(self, channel: Any, pb: ModuleType, pb_grpc: ModuleType) -> None:
        self._stub = pb_grpc.TestServiceStub(channel)
        self._message = pb.Message

    async def unary(self, payload: bytes) -> None:
        await self._stub.Unary(self._message(payload=payload))

    async def server_stream(self, count: int, payload: bytes) -> int:
        call = await _maybe_await(
            self._stub.ServerStream(self._message(payload=payload, count=count))
        )
        received = 0
        async for _ in call:
            received += 1
        return received

    @contextlib.asynccontextmanager
    async def bidi(self) -> AsyncIterator[_Bidi]:
        call = await _maybe_await(self._stub.BidiStream())
        yield _Bidi(call, self._message)
        await call.done_writing()
        reply = await call.read()
        if reply is not None and reply is not grpc.aio.EOF:
            raise AssertionError("unexpected BidiStream reply")


def _servicer(pb: ModuleType, pb_grpc: ModuleType) -> Any:
    message = pb.Message

    class Servicer(pb_grpc.TestServiceServicer):  # type: ignore[misc,name-defined]
        async def Unary(self, request: Any, context: Any) -> Any:
            return request

        async def ServerStream(self, request: Any, context: Any) -> AsyncIterator[Any]:
            reply = message(payload=request.payload)
            for _ in range(request.count):
                yield reply

        async def BidiStream(self, requests: Any, context: Any) -> AsyncIterator[Any]:
            LIVE.enter()
            try:
                async for request in requests:
                    yield request
            finally:
                LIVE.exit()

    return Servicer()


def _register_tunneled(target: Any, pb: ModuleType) -> None:
    """Register the benchmark service with a grpctunnel-py handler or reverse server."""
    message = pb.Message

    async def unary(request: bytes, context: Any) -> Any:
        return message.FromString(request)

    async def server_stream(request: bytes, stream: Any, context: Any) -> None:
        parsed = message.FromString(request)
        reply = message(payload=parsed.payload)
        for _ in range(parsed.count):
            await stream.send_message(reply)

    async def bidi(stream: Any, context: Any) -> None:
        LIVE.enter()
        try:
            while True:
                try:
                    request = await stream.recv_message()
                except StopAsyncIteration:
                    return
                await stream.send_message(message.FromString(request))
        finally:
            LIVE.exit()

    target.register_method(SERVICE + "Unary", unary)
    target.register_method(SERVICE + "ServerStream", server_stream, is_server_stream=True)
    target.register_method(
        SERVICE + "BidiStream", bidi, is_client_stream=True, is_server_stream=True
    )


@dataclass
class Setup:
    client: GrpcioClient
    connect: Any


@contextlib.asynccontextmanager
async def transport(kind: str, pb: ModuleType, pb_grpc: ModuleType) -> AsyncIterator[Setup]:
    """A grpcio.aio server and a :class:`GrpcioClient` of *kind*."""
    gt: Any = None
    gt_pb: Any = None
    handler: Any = None
    server = grpc.aio.server()
    pb_grpc.add_TestServiceServicer_to_server(_servicer(pb, pb_grpc), server)
    if kind.startswith("gt-"):
        import grpctunnel as gt
        import grpctunnel.proto.v1 as gt_pb

        handler = gt.TunnelServiceHandler()
        _register_tunneled(handler, pb)
        gt_pb.add_TunnelServiceServicer_to_server(handler.service(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    async with contextlib.AsyncExitStack() as stack:

        async def stop_server() -> None:
            await server.stop(grace=None)

        stack.push_async_callback(stop_server)

        async def open_channel() -> Any:
            channel = grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_OWN_CONNECTION)
            stack.push_async_callback(channel.close)
            return channel

        async def forward(channel: Any) -> Any:
            tunnel_channel = await gt.PendingChannel(gt_pb.TunnelServiceStub(channel)).start()
            return tunnel_channel

        @contextlib.asynccontextmanager
        async def reverse(channel: Any) -> AsyncIterator[None]:
            device = gt.ReverseTunnelServer(gt_pb.TunnelServiceStub(channel))
            _register_tunneled(device, pb)
            target = len(await handler.all_reverse_tunnels()) + 1
            serving = asyncio.ensure_future(device.serve())
            try:
                async with asyncio.timeout(TIMEOUT):
                    while len(await handler.all_reverse_tunnels()) < target:
                        if serving.done():
                            raise AssertionError(f"reverse tunnel ended: {serving.result()}")
                        await asyncio.sleep(0.0005)
                yield
            finally:
                serving.cancel()
                await asyncio.gather(serving, return_exceptions=True)

        network = await open_channel()
        if kind == "grpcio":
            channel = network
        elif kind == "gt-forward":
            channel = await forward(network)
        elif kind == "gt-reverse":
            await stack.enter_async_context(reverse(network))
            channel = handler.as_channel()
        else:
            raise ValueError(f"unknown grpcio transport {kind!r}")

        @contextlib.asynccontextmanager
        async def connect(connections: int) -> AsyncIterator[Opener]:
            channels = [
                grpc.aio.insecure_channel(f"127.0.0.1:{port}", options=_OWN_CONNECTION)
                for _ in range(connections)
            ]
            try:
                clients = [GrpcioClient(ch, pb, pb_grpc) for ch in channels]
                for client in clients:
                    await client.unary(b"")
                turn = itertools.cycle(zip(channels, clients, strict=True))
                yield _opener(turn)
            finally:
                # Closing the connections also ends, on the server, any
                # reverse tunnel whose serving task was merely cancelled.
                for ch in channels:
                    await ch.close()
                await asyncio.sleep(0.1)

        def _opener(turn: Any) -> Opener:

            @contextlib.asynccontextmanager
            async def open_forward(ch: Any) -> AsyncIterator[None]:
                tunnel_channel = await forward(ch)
                try:
                    yield
                finally:
                    with contextlib.suppress(Exception):
                        await tunnel_channel.close_async()

            def open_one() -> contextlib.AbstractAsyncContextManager[Any]:
                ch, client = next(turn)
                if kind == "grpcio":
                    return workloads.held_stream(client)
                if kind == "gt-forward":
                    return open_forward(ch)
                return reverse(ch)

            return open_one

        yield Setup(GrpcioClient(channel, pb, pb_grpc), connect)
