"""A transparent proxy in front of a backend, and a device behind NAT reached by key.

Part 1: a grpclib ``Server`` with no services of its own sends every call to
its fallback, a ``Proxy`` to the backend; the caller uses the backend's stubs
unchanged, and the proxy never needs the backend's ``.proto``.

Part 2, the NAT scenario: a device that cannot be dialed runs a
``ReverseTunnelServer`` with no services, only a ``Proxy`` to the backend
next to it, and dials out to a router.  The router serves tunnels and, for
every other method, proxies the call to the device named in the caller's
``tunnel-key`` header.  Callers are ordinary gRPC clients that add one
header; statuses, metadata and deadlines arrive as they were sent.

Run: ``python examples/proxy_nat.py`` (exits 0 when all went as expected).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator, Hashable
from typing import Any

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server
from multidict import MultiMapping

from tunnel import (
    Proxy,
    ReverseTunnelServer,
    TunnelChannel,
    TunnelServiceHandler,
    install_fallback,
)
from tunnel.proxy import ChooseTarget
from tunnel.testing import Message, TestServiceBase, TestServiceStub


class Backend(TestServiceBase):
    """The service behind the proxies: it knows nothing about them."""

    async def unary(self, message: Message) -> Message:
        if message.code:
            raise GRPCError(Status(message.code), "the backend says no")
        return Message(payload=b"backend got " + message.payload)

    async def server_stream(self, message: Message) -> AsyncIterator[Message]:
        for i in range(message.count):
            yield Message(payload=message.payload, count=i + 1)


async def start(server: Server) -> int:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    await server.start(sock=sock)
    port: int = sock.getsockname()[1]
    return port


def by_tunnel_key(handler: TunnelServiceHandler) -> ChooseTarget:
    """The router's choice of target: the device the caller names."""

    def choose(method_name: str, metadata: MultiMapping[Any]) -> Channel:
        key = metadata.get("tunnel-key")
        if key is None:
            raise GRPCError(Status.INVALID_ARGUMENT, "say which device: tunnel-key header")
        return handler.key_as_channel(key)  # no such device: UNAVAILABLE

    return choose


def device_id(channel: TunnelChannel) -> Hashable:
    return channel.metadata.get("device-id")


async def main() -> int:
    ok = True
    backend = Server([Backend()])
    backend_port = await start(backend)
    to_backend = Channel("127.0.0.1", backend_port)

    # -- part 1: a grpclib server proxying everything to the backend ----------------
    front = Server([])
    install_fallback(front, Proxy(to_backend))
    front_port = await start(front)
    caller = Channel("127.0.0.1", front_port)
    try:
        async with asyncio.timeout(10):
            stub = TestServiceStub(caller)
            reply = await stub.unary(Message(payload=b"hello"))
            print(f"caller -> proxy -> backend: {reply.payload.decode()}")
            counts = [m.count async for m in stub.server_stream(Message(count=3))]
            print(f"server streaming through the proxy: {counts}")
            ok = ok and counts == [1, 2, 3]
    finally:
        caller.close()
        front.close()
        await front.wait_closed()

    # -- part 2: router -> reverse tunnel -> device -> local backend ---------------------
    handler = TunnelServiceHandler(affinity_key=device_id)
    router = Server([handler])
    install_fallback(router, Proxy(by_tunnel_key(handler)))
    router_port = await start(router)

    device_channel = Channel("127.0.0.1", router_port)
    device = ReverseTunnelServer(device_channel, [], fallback=Proxy(to_backend))
    serving = asyncio.create_task(device.serve_forever(metadata={"device-id": "kitchen"}))
    caller = Channel("127.0.0.1", router_port)
    try:
        async with asyncio.timeout(10):
            await handler.key_as_channel("kitchen").wait_ready()
            print("router: device 'kitchen' registered")
            stub = TestServiceStub(caller)
            reply = await stub.unary(Message(payload=b"hi"), metadata={"tunnel-key": "kitchen"})
            print(f"caller -> router -> kitchen -> backend: {reply.payload.decode()}")
            refused = Message(code=Status.PERMISSION_DENIED.value)
            for metadata, expected in (
                ({"tunnel-key": "kitchen"}, Status.PERMISSION_DENIED),  # the backend's answer
                ({"tunnel-key": "attic"}, Status.UNAVAILABLE),  # no such device
                ({}, Status.INVALID_ARGUMENT),  # no key at all
            ):
                try:
                    await stub.unary(refused, metadata=metadata)
                    ok = False
                except GRPCError as exc:
                    print(f"{metadata or 'no key'}: {exc.status.name} ({exc.message})")
                    ok = ok and exc.status is expected
    finally:
        caller.close()
        device.close()
        await serving
        device_channel.close()
        router.close()
        await router.wait_closed()
        to_backend.close()
        backend.close()
        await backend.wait_closed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
