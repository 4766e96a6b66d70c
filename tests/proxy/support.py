"""Routes through a proxy to a backend, all in one process on 127.0.0.1.

A *route* is how a caller reaches the backend (a grpclib server serving
``TestService`` and ``Probe``):

- ``direct``: the caller's channel goes to the backend (the control group);
- ``grpclib``: caller -> a grpclib ``Server`` whose fallback is a ``Proxy``
  to the backend -> backend;
- ``forward``: the caller opens a forward tunnel to a server whose
  ``TunnelServiceHandler`` serves no services, only a fallback ``Proxy`` to
  the backend;
- ``reverse``: the NAT scenario.  A *router* (grpclib ``Server`` with a
  ``TunnelServiceHandler`` accepting reverse tunnels, and a fallback
  ``Proxy`` that picks the device by the caller's ``tunnel-key`` header) and
  a *device* (``ReverseTunnelServer`` with no services, only a fallback
  ``Proxy`` to its local backend) that dialed into the router.

The caller only adds ``route.metadata`` to its calls.  Everything is opened
with ``async with`` in the test's own task and closed in reverse order:
callers, device, router, backend.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable, Hashable
from dataclasses import dataclass, field
from typing import Any

import grpclib.client
import grpclib.config
import grpclib.server
from grpclib.const import Cardinality, Handler, Status
from grpclib.encoding.base import StatusDetailsCodecBase
from grpclib.exceptions import GRPCError
from multidict import MultiDict, MultiMapping

import tunnel
from tests.conftest import _listening_socket
from tests.reverse.support import registered
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing.service import TestService

ROUTES = ("direct", "grpclib", "forward", "reverse")
PROXIED = ROUTES[1:]

#: Upper bound of one test's body.
TEST_TIMEOUT = 30.0
#: What "at once" / "promptly" means in these tests.
PROMPT = 5.0

KEY_HEADER = "tunnel-key"
DEVICE_KEY = "device-1"
#: The header a device sends to register under a key.
DEVICE_HEADER = "device-key"

#: A grpclib configuration with the smallest HTTP/2 windows grpclib allows,
#: for tests that watch flow control.
SMALL_WINDOWS = grpclib.config.Configuration(
    http2_connection_window_size=65_535, http2_stream_window_size=65_535
)


class Probe:
    """Backend handlers that let a test watch what reached the backend.

    All of them take and give ``Message`` (grpchantesting's), as raw grpclib
    streams, so they see metadata, deadlines and cancellation.
    """

    PREFIX = "/probe.Probe/"

    def __init__(self) -> None:
        self.started = asyncio.Event()
        self.cancelled = asyncio.Event()
        self.deadlines: list[float | None] = []
        #: Flood: messages the backend sent, and the caller read (the test
        #: counts these); the largest lead of one over the other.
        self.sent = 0
        self.read = 0
        self.max_lead = 0
        self.lead_over: int | None = None
        self.lead_exceeded = asyncio.Event()
        self.release = asyncio.Event()

    def _note_lead(self, lead: int) -> None:
        self.max_lead = max(self.max_lead, lead)
        if self.lead_over is not None and lead > self.lead_over:
            self.lead_exceeded.set()

    async def deadline(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        """Unary: record the deadline the backend sees."""
        await stream.recv_message()
        self.deadlines.append(None if stream.deadline is None else stream.deadline.time_remaining())
        await stream.send_message(Message())

    async def block(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        """Bidi: wait (for cancellation) after the first request."""
        await stream.recv_message()
        self.started.set()
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            self.cancelled.set()
            raise

    async def end_early(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        """Bidi: answer the first request, then end the call while the caller sends."""
        await stream.recv_message()
        await stream.send_message(Message(payload=b"first"))
        await stream.send_trailing_metadata(
            status=Status.ABORTED, status_message="enough", metadata={"why": "because"}
        )

    async def flood(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        """Server streaming: ``count`` messages of ``len(payload)`` bytes, fast."""
        request = await stream.recv_message()
        assert request is not None
        for _ in range(request.count):
            await stream.send_message(Message(payload=request.payload))
            self.sent += 1
            self._note_lead(self.sent - self.read)

    async def sink(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        """Client streaming: read nothing until ``release``, then count."""
        await self.release.wait()
        async for _ in stream:
            self.read += 1
        await stream.send_message(Message(count=self.read))

    def note_sent_by_caller(self) -> None:
        self.sent += 1
        self._note_lead(self.sent - self.read)

    def __mapping__(self) -> dict[str, Handler]:
        unary, bidi = Cardinality.UNARY_UNARY, Cardinality.STREAM_STREAM
        return {
            self.PREFIX + "Deadline": Handler(self.deadline, unary, Message, Message),
            self.PREFIX + "Block": Handler(self.block, bidi, Message, Message),
            self.PREFIX + "EndEarly": Handler(self.end_early, bidi, Message, Message),
            self.PREFIX + "Flood": Handler(self.flood, Cardinality.UNARY_STREAM, Message, Message),
            self.PREFIX + "Sink": Handler(self.sink, Cardinality.STREAM_UNARY, Message, Message),
        }


@dataclass
class Route:
    """How the caller reaches the backend, and what it must add to its calls."""

    kind: str
    channel: grpclib.client.Channel
    probe: Probe
    metadata: dict[str, str] = field(default_factory=dict)
    #: The router's tunnel handler and the device (``reverse`` only).
    handler: tunnel.TunnelServiceHandler | None = None
    device: tunnel.ReverseTunnelServer | None = None

    def md(self, extra: Any = ()) -> MultiDict[Any]:
        """The route's metadata plus ``extra``."""
        result: MultiDict[Any] = MultiDict(self.metadata)
        result.extend(MultiDict(extra))
        return result

    def call(
        self, name: str, cardinality: Cardinality, *, timeout: float | None = None
    ) -> grpclib.client.Stream[Message, Message]:
        """A call of ``name`` (grpchantesting messages) with the route's metadata."""
        return self.channel.request(
            name, cardinality, Message, Message, timeout=timeout, metadata=self.metadata
        )


def choose_by_key(handler: tunnel.TunnelServiceHandler) -> tunnel.proxy.ChooseTarget:
    """The router's choice: the device whose key the caller names."""

    def choose(method_name: str, metadata: MultiMapping[Any]) -> grpclib.client.Channel:
        key = metadata.get(KEY_HEADER)
        if key is None:
            raise GRPCError(Status.INVALID_ARGUMENT, f"no {KEY_HEADER} header")
        return handler.key_as_channel(key)

    return choose


def device_key(channel: tunnel.TunnelChannel) -> Hashable:
    return channel.metadata.get(DEVICE_HEADER)


class Stack:
    """Servers, channels and tasks of one route, closed in reverse order."""

    def __init__(self, exits: contextlib.AsyncExitStack) -> None:
        self.exits = exits

    async def serve(
        self,
        handlers: list[Any],
        *,
        config: grpclib.config.Configuration | None = None,
        fallback: tunnel.Fallback | None = None,
    ) -> int:
        """Serve ``handlers`` (and ``fallback``) on a new server; its port."""
        server = grpclib.server.Server(handlers, config=config)
        if fallback is not None:
            tunnel.install_fallback(server, fallback)
        return await self.start(server)

    async def start(self, server: grpclib.server.Server) -> int:
        """Start ``server`` on 127.0.0.1 (a kernel-chosen port); its port."""
        sock = _listening_socket()
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            raise

        async def stop() -> None:
            server.close()
            async with asyncio.timeout(PROMPT):
                await server.wait_closed()

        self.exits.push_async_callback(stop)
        port: int = sock.getsockname()[1]
        return port

    def channel(
        self,
        port: int,
        *,
        config: grpclib.config.Configuration | None = None,
        status_details_codec: StatusDetailsCodecBase | None = None,
    ) -> grpclib.client.Channel:
        channel = grpclib.client.Channel(
            "127.0.0.1", port, config=config, status_details_codec=status_details_codec
        )
        self.exits.callback(channel.close)
        return channel

    async def device(
        self,
        router_port: int,
        handler: tunnel.TunnelServiceHandler,
        fallback: tunnel.Fallback,
        options: tunnel.TunnelOptions,
    ) -> tunnel.ReverseTunnelServer:
        device = tunnel.ReverseTunnelServer(
            self.channel(router_port), [], fallback=fallback, options=options
        )
        serving = asyncio.create_task(device.serve({DEVICE_HEADER: DEVICE_KEY}))

        async def stop() -> None:
            device.close()
            async with asyncio.timeout(PROMPT):
                await asyncio.gather(serving, return_exceptions=True)

        self.exits.push_async_callback(stop)
        await registered(handler, DEVICE_KEY, serving)
        return device


@contextlib.asynccontextmanager
async def open_route(
    kind: str,
    *,
    config: grpclib.config.Configuration | None = None,
    options: tunnel.TunnelOptions | None = None,
    status_details_codec: StatusDetailsCodecBase | None = None,
    proxy: Callable[[grpclib.client.Channel], tunnel.Proxy] = tunnel.Proxy,
) -> AsyncIterator[Route]:
    """The route ``kind`` to a fresh backend.

    ``config`` is every grpclib server's and channel's, ``options`` every
    tunnel end's; ``status_details_codec`` the caller's channel's;
    ``proxy`` makes the proxy in front of the backend from its channel.
    """
    options = options or tunnel.TunnelOptions()
    probe = Probe()
    async with contextlib.AsyncExitStack() as exits:
        stack = Stack(exits)
        backend_port = await stack.serve([TestService(), probe], config=config)
        to_backend = stack.channel(backend_port, config=config)
        handler = device = None
        metadata: dict[str, str] = {}
        if kind == "direct":
            port = backend_port
        elif kind == "grpclib":
            port = await stack.serve([], config=config, fallback=proxy(to_backend))
        elif kind == "forward":
            served = tunnel.TunnelServiceHandler(fallback=proxy(to_backend), options=options)
            port = await stack.serve([served], config=config)
        elif kind == "reverse":
            handler = tunnel.TunnelServiceHandler(affinity_key=device_key, options=options)
            port = await stack.serve(
                [handler], config=config, fallback=tunnel.Proxy(choose_by_key(handler))
            )
            device = await stack.device(port, handler, proxy(to_backend), options)
            metadata[KEY_HEADER] = DEVICE_KEY
        else:
            raise ValueError(kind)
        channel = stack.channel(port, config=config, status_details_codec=status_details_codec)
        if kind == "forward":
            opened = await exits.enter_async_context(tunnel.open_tunnel(channel, options=options))
            assert isinstance(opened, tunnel.TunnelChannel)
            channel = opened
        yield Route(kind, channel, probe, metadata, handler, device)
