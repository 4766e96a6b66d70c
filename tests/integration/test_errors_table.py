"""The error table of ``tunnel/errors.py``, row by row, against real grpclib servers.

Where grpclib has a convention, the tunneled case is compared with the same
thing done over a plain grpclib channel (the control group): the caller must
see the same exception class.  Three rows are tested where their mechanism
is: "the peer breaks negotiation" in ``test_refused.py`` (every way a first
frame can be wrong), "the opening takes longer than ``negotiation_timeout``"
in ``tests/field/test_opening.py`` and "the peer stops answering keepalive
checks" in ``tests/field/test_keepalive.py``; a frame over ``max_frame_size``
in ``test_frame_bound.py`` (every end).  Only the tunnel client waits
for the peer's ``Settings``: for a reverse tunnel that is the network
server, and a device whose tunnel it cannot negotiate gets the server's
refusal.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpclib.client
import grpclib.server
import pytest
from google.protobuf.empty_pb2 import Empty
from grpclib.const import Cardinality, Handler, Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError, ProtocolError

import tunnel
from tests.conftest import DIRECT, FORWARD, MODES, reverse_tunnel
from tests.integration.support import (
    TEST_TIMEOUT,
    Blocking,
    FakeTunnelServer,
    Probe,
    Proxy,
    call_until_it_ends,
    connected,
    options,
    serving,
    tunnel_over,
)
from tunnel._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    Metadata,
    ServerToClient,
    Settings,
)
from tunnel.testing import Message
from tunnel.testing import TestService as Service
from tunnel.testing import TestServiceStub as Stub

#: How long a call may take to end once the cause of its end happened.
PROMPTLY = 5.0

REVERSE = next(m for m in MODES if m.name == "reverse-fc")
#: A direct call (grpclib's own behaviour), a forward and a reverse tunneled one.
CALLERS = [DIRECT, FORWARD, REVERSE]

UNARY = "/grpchantesting.TestService/Unary"
SETTINGS = ServerToClient(
    stream_id=-1,
    settings=Settings(
        supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE], initial_window_size=65536
    ),
)
#: A frame for a stream the tunnel client never opened: the tunnel must end.
NEVER_OPENED = ServerToClient(stream_id=7, response_headers=Metadata())


def unary(channel: grpclib.client.Channel) -> grpclib.client.Stream[Message, Message]:
    return channel.request(UNARY, Cardinality.UNARY_UNARY, Message, Message)


# -- a call that ends with a status: GRPCError --------------------------------------


@pytest.mark.parametrize("mode", CALLERS, ids=str, indirect=True)
async def test_a_handlers_status_is_a_grpc_error(channel: grpclib.client.Channel) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(GRPCError) as failed:
            await Stub(channel).unary(Message(code=Status.FAILED_PRECONDITION.value))
    assert failed.value.status is Status.FAILED_PRECONDITION


@dataclass
class Blocked:
    """A tunnel whose other end runs ``Blocking`` handlers, through a cuttable proxy."""

    #: Where the test makes its calls (for a reverse tunnel: the network server's pool).
    caller: grpclib.client.Channel
    #: The tunnel those calls travel in.
    tunnel_channel: tunnel.TunnelChannel
    proxy: Proxy
    blocking: Blocking


@contextlib.asynccontextmanager
async def blocked(kind: str) -> AsyncIterator[Blocked]:
    blocking = Blocking()
    services = [blocking.service()]
    handler = tunnel.TunnelServiceHandler(services if kind == "forward" else [])
    async with serving([handler]) as served, Proxy(served.port) as proxy:
        if kind == "forward":
            async with tunnel_over(proxy.port) as channel:
                yield Blocked(channel, channel, proxy, blocking)
        else:
            async with (
                connected(proxy.port) as device_channel,
                reverse_tunnel(device_channel, services, handler, options()) as pool,
            ):
                (tunnel_channel,) = handler.all_reverse_tunnels()
                yield Blocked(pool, tunnel_channel, proxy, blocking)


async def a_blocked_call(setup: Blocked) -> asyncio.Task[BaseException | None]:
    call = asyncio.create_task(call_until_it_ends(setup.caller, "Unary"))
    async with asyncio.timeout(PROMPTLY):
        await setup.blocking.started.wait(1)
    return call


@pytest.mark.parametrize(
    ("kind", "how"),
    [
        ("forward", "connection-lost"),
        ("reverse", "connection-lost"),
        ("forward", "callers-close"),
        ("reverse", "callers-close"),
    ],
)
async def test_a_tunnel_that_ends_fails_its_calls(kind: str, how: str) -> None:
    """Gone: UNAVAILABLE and ``error`` says why; the caller's own ``close()``: CANCELLED."""
    lost = how == "connection-lost"
    async with asyncio.timeout(TEST_TIMEOUT), blocked(kind) as setup:
        call = await a_blocked_call(setup)
        if lost:
            setup.proxy.cut()
        else:
            setup.tunnel_channel.close()
        async with asyncio.timeout(PROMPTLY):
            outcome = await call
            await setup.tunnel_channel.wait_closed()
        assert isinstance(outcome, GRPCError), repr(outcome)
        assert outcome.status is (Status.UNAVAILABLE if lost else Status.CANCELLED)
        assert (setup.tunnel_channel.error is not None) is lost


# -- a local deadline: asyncio.TimeoutError ------------------------------------------


@pytest.mark.parametrize("mode", CALLERS, ids=str, indirect=True)
async def test_a_local_deadline_is_a_timeout_error(channel: grpclib.client.Channel) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(asyncio.TimeoutError):
            await Stub(channel).unary(Message(delay_millis=10_000), timeout=0.2)


# -- misuse of a call's stream API: grpclib's ProtocolError --------------------------


@pytest.mark.parametrize("mode", CALLERS, ids=str, indirect=True)
async def test_misusing_a_stream_is_a_protocol_error(channel: grpclib.client.Channel) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with unary(channel) as stream:
            with pytest.raises(ProtocolError):
                await stream.end()  # before the request
            await stream.send_message(Message(payload=b"once"), end=True)
            with pytest.raises(ProtocolError):
                await stream.send_message(Message(payload=b"twice"))
            reply = await stream.recv_message()
        assert reply is not None and reply.payload == b"once"


# -- metadata that cannot be sent ----------------------------------------------------


@pytest.mark.parametrize("mode", CALLERS, ids=str, indirect=True)
@pytest.mark.parametrize(
    ("metadata", "raised"),
    [({"Not A Key": "x"}, ValueError), ({"x-number": 1}, TypeError)],
    ids=["bad-key", "bad-value-type"],
)
async def test_metadata_grpclib_refuses_raises_as_grpclib_does(
    channel: grpclib.client.Channel, metadata: dict[str, object], raised: type[Exception]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(raised) as refused:
            # Metadata grpclib refuses: bad input on purpose.
            await Stub(channel).unary(Message(), metadata=metadata)  # type: ignore[arg-type]
        assert not isinstance(refused.value, tunnel.TunnelError)
        # Only that call failed.
        assert (await Stub(channel).unary(Message(payload=b"ok"))).payload == b"ok"


@pytest.mark.parametrize("mode", [FORWARD, REVERSE], ids=str, indirect=True)
@pytest.mark.parametrize(
    "metadata",
    [{"x-bad-bin": b"\xff\xfe"}, {"x-big": "x" * tunnel.TunnelOptions().max_metadata_size}],
    ids=["binary-not-utf8", "over-max-metadata-size"],
)
async def test_metadata_a_tunnel_cannot_carry_is_a_metadata_error(
    channel: grpclib.client.Channel, metadata: dict[str, str | bytes]
) -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(tunnel.MetadataError) as refused:
            await Stub(channel).unary(Message(), metadata=metadata)
        assert isinstance(refused.value, ValueError)
        assert (await Stub(channel).unary(Message(payload=b"ok"))).payload == b"ok"


async def test_a_handler_sending_metadata_a_tunnel_cannot_carry_gets_a_metadata_error() -> None:
    seen: list[BaseException] = []

    async def sends_bad_headers(stream: grpclib.server.Stream[Message, Message]) -> None:
        request = await stream.recv_message()
        try:
            await stream.send_initial_metadata(metadata={"x-bad-bin": b"\xff\xfe"})
        except Exception as exc:
            seen.append(exc)
        assert request is not None
        await stream.send_message(request)

    probe = Probe(SendsBadHeaders=(Cardinality.UNARY_UNARY, sends_bad_headers))
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([probe])]) as served,
        tunnel_over(served.port) as channel,
    ):
        name = "/tunnel.integration.Probe/SendsBadHeaders"
        async with channel.request(name, Cardinality.UNARY_UNARY, Message, Message) as stream:
            await stream.send_message(Message(payload=b"hi"), end=True)
            answer = await stream.recv_message()
        assert answer is not None and answer.payload == b"hi"
    assert [type(exc) for exc in seen] == [tunnel.MetadataError]


# -- opening a tunnel -----------------------------------------------------------------


async def open_and_close(kind: str, channel: grpclib.client.Channel) -> None:
    """Open one tunnel of *kind* over *channel* and close it again."""
    if kind == "open_tunnel":
        async with tunnel.open_tunnel(channel):
            return
    device = tunnel.ReverseTunnelServer(channel, [Service()])
    serving_ = asyncio.create_task(device.serve())
    # serve() returns only when the tunnel ends; a refused one ends at once.
    done, _ = await asyncio.wait({serving_}, timeout=PROMPTLY)
    device.close()
    await serving_
    assert done, "serve() kept a refused tunnel open"


OPENERS = ["open_tunnel", "ReverseTunnelServer.serve"]


@pytest.mark.parametrize("kind", OPENERS)
async def test_a_refused_tunnel_is_the_servers_grpc_error(kind: str) -> None:
    async def refuse(event: RecvRequest) -> None:
        raise GRPCError(Status.UNAUTHENTICATED, "no token")

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([tunnel.TunnelServiceHandler([Service()])]) as served,
        connected(served.port) as channel,
    ):
        listen(served.server, RecvRequest, refuse)
        with pytest.raises(GRPCError) as refused:
            await open_and_close(kind, channel)
    assert (refused.value.status, refused.value.message) == (Status.UNAUTHENTICATED, "no token")


@pytest.mark.parametrize("kind", ["grpclib", *OPENERS])
async def test_no_connection_is_grpclibs_os_error_unchanged(kind: str) -> None:
    # Bound but not listening: the kernel refuses every connection to it.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        channel = grpclib.client.Channel("127.0.0.1", sock.getsockname()[1])
        try:
            async with asyncio.timeout(TEST_TIMEOUT):
                with pytest.raises(OSError) as failed:
                    if kind == "grpclib":
                        await Stub(channel).unary(Message())
                    else:
                        await open_and_close(kind, channel)
        finally:
            channel.close()
    assert type(failed.value) is ConnectionRefusedError


# -- a peer that breaks the protocol: RemoteProtocolError, calls UNAVAILABLE -----------


async def fake_device(channel: grpclib.client.Channel) -> None:
    """A device that opens a reverse tunnel and breaks it at the first call.

    The network server then ends the carrying call with INTERNAL.
    """
    with contextlib.suppress(GRPCError):
        async with channel.request(
            "/grpctunnel.v1.TunnelService/OpenReverseTunnel",
            Cardinality.STREAM_STREAM,
            ServerToClient,
            ClientToServer,
            metadata={"grpctunnel-negotiate": "on"},
        ) as stream:
            await stream.send_message(SETTINGS)
            await stream.recv_message()  # the network server's first new_stream
            await stream.send_message(NEVER_OPENED)
            while await stream.recv_message() is not None:
                pass


@pytest.mark.parametrize("kind", ["forward", "reverse"])
async def test_a_peer_that_breaks_the_protocol_ends_the_tunnel(kind: str) -> None:
    async with contextlib.AsyncExitStack() as stack:
        await stack.enter_async_context(asyncio.timeout(TEST_TIMEOUT))
        if kind == "forward":
            fake = FakeTunnelServer(SETTINGS, after_request=[NEVER_OPENED])
            served = await stack.enter_async_context(serving([fake]))
            channel = await stack.enter_async_context(tunnel_over(served.port))
            caller: grpclib.client.Channel = channel
        else:
            handler = tunnel.TunnelServiceHandler()
            served = await stack.enter_async_context(serving([handler]))
            device_channel = await stack.enter_async_context(connected(served.port))
            device = asyncio.create_task(fake_device(device_channel))
            stack.push_async_callback(asyncio.wait_for, device, PROMPTLY)
            pool = handler.as_channel()
            caller = pool
            async with asyncio.timeout(PROMPTLY):
                await pool.wait_ready()
            (channel,) = handler.all_reverse_tunnels()

        with pytest.raises(GRPCError) as failed:
            await Stub(caller).unary(Message(), timeout=PROMPTLY)
        assert failed.value.status is Status.UNAVAILABLE
        async with asyncio.timeout(PROMPTLY):
            await channel.wait_closed()
        assert isinstance(channel.error, tunnel.RemoteProtocolError)
        assert not isinstance(channel.error, tunnel.NegotiationError)
        assert str(channel.error) in (failed.value.message or "")


class BreaksReverseTunnels:
    """A network server that accepts a reverse tunnel and then breaks its protocol."""

    async def open_reverse_tunnel(
        self, stream: grpclib.server.Stream[ServerToClient, ClientToServer]
    ) -> None:
        await stream.send_initial_metadata(metadata={"grpctunnel-negotiate": "on"})
        await stream.recv_message()  # the device's Settings
        await stream.send_message(ClientToServer(stream_id=5, half_close=Empty()))
        while await stream.recv_message() is not None:
            pass

    def __mapping__(self) -> dict[str, Handler]:
        return {
            "/grpctunnel.v1.TunnelService/OpenReverseTunnel": Handler(
                self.open_reverse_tunnel,
                Cardinality.STREAM_STREAM,
                ServerToClient,
                ClientToServer,
            )
        }


@pytest.mark.parametrize("how", ["protocol-error", "connection-lost"])
async def test_a_reverse_tunnel_failing_after_it_opened_ends_serve_with_a_status(
    how: str,
) -> None:
    handler = tunnel.TunnelServiceHandler()
    network_server = BreaksReverseTunnels() if how == "protocol-error" else handler
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([network_server]) as served,
        Proxy(served.port) as proxy,
        connected(proxy.port) as channel,
    ):
        device = tunnel.ReverseTunnelServer(channel, [Service()])
        serving_ = asyncio.create_task(device.serve())
        try:
            if how == "connection-lost":
                async with asyncio.timeout(PROMPTLY):
                    await handler.as_channel().wait_ready()
                proxy.cut()
            async with asyncio.timeout(PROMPTLY):
                with pytest.raises(GRPCError) as failed:
                    await serving_
        finally:
            device.close()
            await asyncio.gather(serving_, return_exceptions=True)
    if how == "protocol-error":
        assert failed.value.status is Status.INTERNAL
        assert "tunnel protocol error: " in (failed.value.message or "")
        assert "never opened" in (failed.value.message or "")
    else:
        assert failed.value.status is Status.UNAVAILABLE
        assert "connection lost" in (failed.value.message or "").lower(), failed.value
