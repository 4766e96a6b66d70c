"""Reverse authentication: the device checks who is calling it.

In a reverse tunnel the *network server* makes the calls, so the device
(the network client, the tunnel's server) wants to know it talks to the
real server before it serves anything.  The server proves itself once: a
``SendInitialMetadata`` listener on its grpclib ``Server`` puts a token into
the response headers of ``OpenReverseTunnel``.  The device sees those headers
as ``ReverseTunnelServer.response_metadata`` and, in every tunneled handler,
as ``current_tunnel().response_metadata``; a ``RecvRequest`` listener on the
``ReverseTunnelServer`` authorizes every call against them.

A real deployment would send a signed token (or rely on mutual TLS); a
shared secret keeps the example short.

Run: ``python examples/reverse_credentials.py`` (exits 0 when all went as expected).
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import sys

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.events import RecvRequest, SendInitialMetadata, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from tunnel import ReverseTunnelServer, TunnelServiceHandler, current_tunnel
from tunnel.testing import Message, TestServiceBase, TestServiceStub

OPEN_REVERSE_TUNNEL = "/grpctunnel.v1.TunnelService/OpenReverseTunnel"
TRUSTED_SERVER_TOKEN = "router-7f3a"

# -- the network server -------------------------------------------------------------

_method: contextvars.ContextVar[str] = contextvars.ContextVar("method", default="")


async def remember_method(event: RecvRequest) -> None:
    _method.set(event.method_name)


async def start_server(name: str, token: str) -> tuple[Server, TunnelServiceHandler, int]:
    """A server that presents *token* to every device that opens a reverse tunnel."""

    async def present_credentials(event: SendInitialMetadata) -> None:
        if _method.get() == OPEN_REVERSE_TUNNEL:
            event.metadata["x-server-token"] = token

    handler = TunnelServiceHandler()
    server = Server([handler])
    listen(server, RecvRequest, remember_method)
    listen(server, SendInitialMetadata, present_credentials)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.start(sock=sock)
    print(f"{name}: listening on 127.0.0.1:{port}")
    return server, handler, port


# -- the device ---------------------------------------------------------------------


class Lock(TestServiceBase):
    async def unary(self, message: Message) -> Message:
        return Message(payload=b"door " + message.payload)


async def authorize(event: RecvRequest) -> None:
    """Every tunneled call: is the server at the other end the one we trust?"""
    info = current_tunnel()
    token = info.response_metadata.get("x-server-token") if info else None
    if token != TRUSTED_SERVER_TOKEN:
        raise GRPCError(Status.PERMISSION_DENIED, "this server is not trusted")


async def run_device(name: str, port: int, handler: TunnelServiceHandler) -> str:
    """Connect a device to the server on *port*, let the server call it once."""
    channel = Channel("127.0.0.1", port)
    device = ReverseTunnelServer(channel, [Lock()])
    listen(device, RecvRequest, authorize)
    serving = asyncio.create_task(device.serve())
    try:
        await handler.as_channel().wait_ready()
        assert device.response_metadata is not None
        print(f"device: {name} presented token {device.response_metadata['x-server-token']!r}")
        try:
            reply = await TestServiceStub(handler.as_channel()).unary(Message(payload=b"opened"))
            outcome = reply.payload.decode()
        except GRPCError as exc:
            outcome = f"{exc.status.name}: {exc.message}"
        print(f"{name}: asked the device to open the door -> {outcome}")
        return outcome
    finally:
        device.close()
        await serving
        channel.close()


async def main() -> int:
    async with asyncio.timeout(10):
        real = await start_server("router", TRUSTED_SERVER_TOKEN)
        rogue = await start_server("rogue", "let-me-in")
        try:
            trusted_outcome = await run_device("router", real[2], real[1])
            rogue_outcome = await run_device("rogue", rogue[2], rogue[1])
        finally:
            for server, _, _ in (real, rogue):
                server.close()
                await server.wait_closed()
    ok = trusted_outcome == "door opened" and rogue_outcome.startswith("PERMISSION_DENIED")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
