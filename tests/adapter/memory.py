"""An in-memory carrying call, with faults on demand.

The tier between the sans-IO core tests and the loopback tests (grpclib
tests its protocol the same way, over a transport stub): a ``ClientTunnel``
and a ``ServerTunnel`` joined by two queues instead of a gRPC call, so a
test can make any one part fail -- a send, a receive, the peer going quiet --
and watch what the rest of the tunnel does.

Frames cross as bytes (serialized and parsed again), as they would on a
real call.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

from google.protobuf.message import Message as ProtoMessage
from grpclib.protocol import Peer
from multidict import MultiDict

import tunnel
from tunnel._carrier import BatchSender
from tunnel._client_tunnel import ClientTunnel
from tunnel._pb.tunnel_pb2 import ClientToServer, ServerToClient
from tunnel._server_tunnel import Handlers, ServerTunnel, TunnelInfo

In = TypeVar("In", bound=ProtoMessage)
Out = TypeVar("Out", bound=ProtoMessage)

#: Put in a queue: the sending side ended its half of the call.
END = b""


class Broken(ConnectionError):
    """The fault a test injected."""


class MemoryCarrier(Generic[In, Out]):
    """One end of an in-memory call; ``fail_*`` make the next operation fail."""

    #: No connection under the call, and one frame per send.
    peer: Peer | None = None
    send_batch: BatchSender | None = None

    def __init__(
        self,
        inbox: asyncio.Queue[bytes],
        outbox: asyncio.Queue[bytes],
        in_type: type[In],
        *,
        can_half_close: bool,
    ) -> None:
        self._inbox = inbox
        self._outbox = outbox
        self._in_type = in_type
        self.can_half_close = can_half_close
        #: Frames sent so far.
        self.sent = 0
        #: Send this many more frames, then fail every send (None: never).
        self.fail_send_after: int | None = None
        #: Set to make the blocked or next ``recv`` fail.
        self.fail_recv = asyncio.Event()
        #: Set to stop delivering our frames (the peer hears nothing).
        self.mute = False
        self.ended = False
        self.aborted = False

    async def send(self, frame: Out) -> None:
        if self.fail_send_after is not None and self.sent >= self.fail_send_after:
            raise Broken("send failed")
        self.sent += 1
        if not self.mute:
            await self._outbox.put(frame.SerializeToString())

    async def recv(self) -> In | None:
        if self.fail_recv.is_set():
            raise Broken("recv failed")
        get = asyncio.ensure_future(self._inbox.get())
        fail = asyncio.ensure_future(self.fail_recv.wait())
        try:
            await asyncio.wait({get, fail}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            fail.cancel()
            if not get.done():
                get.cancel()
        if not get.done() or get.cancelled():
            raise Broken("recv failed")
        data = get.result()
        if data == END:
            return None
        return self._in_type.FromString(data)

    async def end(self) -> None:
        if not self.ended:
            self.ended = True
            await self._outbox.put(END)

    async def finish(self) -> None:
        pass

    async def aclose(self) -> None:
        pass

    def abort_connection(self) -> None:
        self.aborted = True

    def connection_lost(self) -> bool:
        return False


@dataclass
class Pair:
    client: ClientTunnel
    server: ServerTunnel
    client_carrier: MemoryCarrier[ServerToClient, ClientToServer]
    server_carrier: MemoryCarrier[ClientToServer, ServerToClient]
    serving: asyncio.Task[None]

    @property
    def channel(self) -> tunnel.TunnelChannel:
        return tunnel.TunnelChannel(self.client, metadata=MultiDict())


@contextlib.asynccontextmanager
async def tunnel_pair(
    services: Iterable[Any], options: tunnel.TunnelOptions | None = None
) -> AsyncIterator[Pair]:
    """A connected client and server tunnel over memory; both ended on exit."""
    options = options or tunnel.TunnelOptions()
    to_server: asyncio.Queue[bytes] = asyncio.Queue()
    to_client: asyncio.Queue[bytes] = asyncio.Queue()
    client_carrier: MemoryCarrier[ServerToClient, ClientToServer] = MemoryCarrier(
        to_client, to_server, ServerToClient, can_half_close=True
    )
    server_carrier: MemoryCarrier[ClientToServer, ServerToClient] = MemoryCarrier(
        to_server, to_client, ClientToServer, can_half_close=False
    )
    server = ServerTunnel(
        server_carrier,
        Handlers.of(list(services), None),
        info=TunnelInfo(MultiDict(), MultiDict(), None, "forward"),
        options=options,
        peer_negotiates=True,
        user_agent=None,
    )
    serving = asyncio.create_task(server.serve(), name="memory tunnel server")
    # A network server ends the call by returning from its handler; the
    # client then sees the end of the response stream.
    serving.add_done_callback(lambda _: to_client.put_nowait(END))
    client = ClientTunnel(client_carrier, options, peer_negotiates=True)
    try:
        await client.start(options.negotiation_timeout)
        yield Pair(client, server, client_carrier, server_carrier, serving)
    finally:
        client.close()
        server.stop()
        async with asyncio.timeout(10):
            await client.wait_closed()
            await asyncio.gather(serving, return_exceptions=True)
