"""Forward and reverse tunnels on loopback.

Run with ``python -m tunnel.demo`` (needs the ``testing`` extra).  A grpclib
server exposes the test service only *inside* tunnels; the client opens one
tunnel and makes calls of all four kinds through it, with a betterproto stub
used exactly as it would be on a plain channel.  Then a "device" dials in
and opens a reverse tunnel under a key, and the server calls the device's
service through ``key_as_channel``.
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import AsyncIterator

from grpclib.client import Channel
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from tunnel import ReverseTunnelServer, TunnelServiceHandler, open_tunnel

try:
    from tunnel.testing import Message, TestService, TestServiceStub
except ModuleNotFoundError as exc:
    if exc.name != "betterproto":
        raise
    # One line that says what to do, not a traceback.
    sys.exit(f"python -m tunnel.demo: {exc}")


def _listen() -> socket.socket:
    # IPPROTO_TCP makes asyncio set TCP_NODELAY on accepted connections.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    return sock


async def _requests(n: int) -> AsyncIterator[Message]:
    for i in range(n):
        yield Message(payload=f"request {i}".encode())


async def main() -> None:
    handler = TunnelServiceHandler(
        [TestService()], affinity_key=lambda tunnel: tunnel.metadata.get("device-id")
    )
    server = Server([handler])
    sock = _listen()
    port = sock.getsockname()[1]
    await server.start(sock=sock)
    print(f"grpclib server on 127.0.0.1:{port}, TestService reachable only through tunnels")
    channel = Channel("127.0.0.1", port)
    try:
        async with open_tunnel(channel, metadata={"x-demo": "forward"}) as tunnel:
            print(f"forward tunnel open over {tunnel.peer and tunnel.peer.addr()}")
            stub = TestServiceStub(tunnel)

            reply = await stub.unary(Message(payload=b"hello"), metadata={"x-who": "demo"})
            print(f"unary:            {reply.payload!r}, server saw headers {dict(reply.headers)}")

            reply = await stub.client_stream(_requests(3))
            print(f"client streaming: {reply.count} requests, last {reply.payload!r}")

            replies = [r async for r in stub.server_stream(Message(payload=b"tick", count=3))]
            print(f"server streaming: {len(replies)} replies {[r.payload for r in replies]}")

            replies = [r async for r in stub.bidi_stream(_requests(3))]
            print(f"bidi streaming:   {[(r.payload, r.count) for r in replies]}")

            try:
                await stub.unary(Message(payload=b"fail", code=9))
            except GRPCError as exc:
                print(f"error status:     {exc.status.name} {exc.message!r}")
        print("tunnel closed")

        # Reverse: the client serves, the server calls.
        device = ReverseTunnelServer(channel, [TestService()])
        serving = asyncio.create_task(device.serve_forever(metadata={"device-id": "dev-1"}))
        to_device = handler.key_as_channel("dev-1")
        async with asyncio.timeout(10):
            await to_device.wait_ready()
        print(f"reverse tunnel open: device 'dev-1' registered ({to_device!r})")
        reply = await TestServiceStub(to_device).unary(Message(payload=b"ping the device"))
        print(f"server -> device: {reply.payload!r}")
        device.close()
        await serving
        print(f"device closed, key 'dev-1' ready: {to_device.is_ready()}")
    finally:
        channel.close()
        server.close()
        await server.wait_closed()


if __name__ == "__main__":
    asyncio.run(main())
