"""A forward tunnel whose opener is authenticated once, when the tunnel opens.

The network server checks the bearer token in the ``OpenTunnel`` request
headers with an ordinary grpclib ``RecvRequest`` listener and keeps the
caller's identity in a context variable.  Every call that later arrives
through that tunnel runs in that context, so the service reads who is
calling without any per-call credentials.

Run: ``python examples/forward_auth.py`` (exits 0 when all went as expected).
"""

from __future__ import annotations

import asyncio
import contextvars
import socket
import sys

from grpclib.client import Channel
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from tunnel import TunnelServiceHandler, current_tunnel, open_tunnel
from tunnel.testing import Message, TestServiceBase, TestServiceStub

OPEN_TUNNEL = "/grpctunnel.v1.TunnelService/OpenTunnel"
TOKENS = {"s3cret-alice": "alice", "s3cret-bob": "bob"}

#: Who opened the tunnel the current call came through.
identity: contextvars.ContextVar[str] = contextvars.ContextVar("identity")


async def authenticate(event: RecvRequest) -> None:
    """Runs for every call the grpclib server receives, tunnels included."""
    if event.method_name != OPEN_TUNNEL:
        return
    header = event.metadata.get("authorization")
    user = TOKENS.get(header.removeprefix("Bearer ")) if isinstance(header, str) else None
    if user is None:
        raise GRPCError(Status.UNAUTHENTICATED, "unknown token")
    identity.set(user)  # seen by every call through this tunnel


class Greeter(TestServiceBase):
    async def unary(self, message: Message) -> Message:
        info = current_tunnel()
        kind = info.kind if info else "no"
        text = f"hello {identity.get()}, via a {kind} tunnel: {message.payload.decode()}"
        return Message(payload=text.encode())


async def main() -> int:
    # The service is exposed only inside tunnels, not directly.
    server = Server([TunnelServiceHandler([Greeter()])])
    listen(server, RecvRequest, authenticate)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    await server.start(sock=sock)
    print(f"server listening on 127.0.0.1:{port}")
    channel = Channel("127.0.0.1", port)
    ok = True
    try:
        async with asyncio.timeout(10):
            for token in ("s3cret-alice", "s3cret-bob"):
                metadata = {"authorization": f"Bearer {token}"}
                async with open_tunnel(channel, metadata=metadata) as tunneled:
                    stub = TestServiceStub(tunneled)
                    for text in ("first call", "second call"):
                        reply = await stub.unary(Message(payload=text.encode()))
                        print(f"reply: {reply.payload.decode()}")
            try:
                await open_tunnel(channel, metadata={"authorization": "Bearer guess"})
                print("a tunnel with a bad token was opened: unexpected")
                ok = False
            except GRPCError as exc:
                print(f"bad token refused: {exc.status.name} {exc.message}")
                ok = ok and exc.status is Status.UNAUTHENTICATED
    finally:
        channel.close()
        server.close()
        await server.wait_closed()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
