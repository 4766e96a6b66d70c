"""Devices behind NAT register with a server, which then calls them by name.

Each device dials out to the server and opens a reverse tunnel with a
``ReverseTunnelServer``, sending its id in the request headers.  The
server's ``TunnelServiceHandler`` files each tunnel under that id (its
affinity key), and ``key_as_channel(id)`` is a channel to that device: the
server makes ordinary gRPC calls to a client it could never dial.

Run: ``python examples/reverse_device.py`` (exits 0 when all went as expected).
"""

from __future__ import annotations

import asyncio
import socket
import sys
from collections.abc import Hashable

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from tunnel import ReverseTunnelServer, TunnelChannel, TunnelServiceHandler
from tunnel.testing import Message, TestServiceBase, TestServiceStub


class Thermometer(TestServiceBase):
    """What runs on a device: answers with its reading."""

    def __init__(self, room: str, celsius: float) -> None:
        self.room = room
        self.celsius = celsius

    async def unary(self, message: Message) -> Message:
        return Message(payload=f"{self.room}: {self.celsius:.1f} C".encode())


def device_id(channel: TunnelChannel) -> Hashable:
    return channel.metadata.get("device-id")


def opened(channel: TunnelChannel) -> None:
    address = channel.peer.addr() if channel.peer else None
    print(f"server: device {device_id(channel)!r} registered from {address}")


def closed(channel: TunnelChannel) -> None:
    print(f"server: device {device_id(channel)!r} went away")


async def main() -> int:
    handler = TunnelServiceHandler(
        affinity_key=device_id, on_reverse_tunnel_open=opened, on_reverse_tunnel_close=closed
    )
    server = Server([handler])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.start(sock=sock)
    print(f"server listening on 127.0.0.1:{port}")

    # Two devices, each on its own connection, each keeping its tunnel open.
    devices: list[tuple[Channel, ReverseTunnelServer, asyncio.Task[None]]] = []
    for room, celsius in (("kitchen", 21.5), ("garage", 12.5)):
        channel = Channel("127.0.0.1", port)
        device = ReverseTunnelServer(channel, [Thermometer(room, celsius)])
        task = asyncio.create_task(device.serve_forever(metadata={"device-id": room}))
        devices.append((channel, device, task))

    ok = True
    try:
        async with asyncio.timeout(10):
            for room in ("kitchen", "garage"):
                to_device = handler.key_as_channel(room)
                await to_device.wait_ready()
                reply = await TestServiceStub(to_device).unary(Message())
                print(f"server asked {room}: {reply.payload.decode()}")
            try:
                await TestServiceStub(handler.key_as_channel("attic")).unary(Message())
                ok = False
            except GRPCError as exc:
                print(f"server asked attic: {exc.status.name} ({exc.message})")
                ok = ok and exc.status is Status.UNAVAILABLE
            print(f"server: {len(handler.all_reverse_tunnels())} devices connected")
    finally:
        for channel, device, task in devices:
            device.close()
            await task
            channel.close()
        server.close()
        await server.wait_closed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
