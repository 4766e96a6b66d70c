"""Shared fixtures: a leak check, real grpclib servers, and channels by mode.

Every integration test runs against a real ``grpclib.server.Server`` on
127.0.0.1 with a kernel-chosen port, and reaches it through a channel of one
*mode*:

- ``direct``: a plain ``grpclib.client.Channel`` (the control group);
- ``forward-*``: a forward tunnel opened over such a channel, with flow
  control on both sides (``fc``), off on both (``nofc``), or off on only one
  side (``clientnofc``, ``servernofc``: the two ends must then agree on
  protocol revision zero during negotiation);
- ``reverse-*``: the test's process also plays a device that dialed in: a
  ``ReverseTunnelServer`` serves the test service over a reverse tunnel, and
  the channel is the server's ``ReverseChannel`` to it;
- ``reverse-in-forward`` / ``forward-in-reverse``: tunnels nested both ways.

pytest-asyncio runs a fixture's setup, the test, and the fixture's teardown
in three different tasks. Anything that must be entered and exited in one
task (a tunnel's ``async with``) is therefore held open by a task the fixture
owns; see :func:`_hold_open`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any, TypeVar

import grpclib.client
import grpclib.server
import pytest

import tunnel
from tunnel.testing.service import TestService

T = TypeVar("T")

#: How many event-loop rounds finishing tasks get before they count as leaked.
#: Cancelled tasks need a round or two to run their cleanup; a task still
#: pending after this many rounds is waiting for something that will not come.
LEAK_CHECK_ROUNDS = 20

#: Upper bound for setting up or tearing down one fixture resource.
FIXTURE_TIMEOUT = 10.0


# -- warnings -------------------------------------------------------------------------


def pytest_configure(config: pytest.Config) -> None:
    """Python programs the tests start run with warnings as errors too.

    pyproject.toml makes every warning in the tests' own process an error.
    The router, the agent, the examples and the peers run as processes of
    their own, where that filter does not reach; they inherit this one, so a
    warning there (a deprecated call, an unclosed socket) fails the program,
    or shows in the stderr that its test checks.
    """
    os.environ["PYTHONWARNINGS"] = "error"


# -- leak check -----------------------------------------------------------------------


@pytest.fixture(autouse=True)
async def no_leaked_tasks() -> AsyncIterator[None]:
    """Fail the test if it leaves asyncio tasks pending.

    Autouse fixtures are set up first and torn down last, so this runs after
    every server, channel and tunnel of the test has been closed: whatever is
    still pending then was leaked by the code under test (or by the test).
    Leaked tasks are cancelled afterwards so they cannot disturb later tests.
    """
    before = asyncio.all_tasks()
    yield
    me = asyncio.current_task()
    leaked: set[asyncio.Task[Any]] = set()
    for _ in range(LEAK_CHECK_ROUNDS):
        leaked = {t for t in asyncio.all_tasks() if t is not me and t not in before}
        if not leaked:
            return
        await asyncio.sleep(0)
    described = "\n".join(f"  {task!r}" for task in leaked)
    for task in leaked:
        task.cancel()
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(FIXTURE_TIMEOUT):
            await asyncio.gather(*leaked, return_exceptions=True)
    described = "\n".join(f"  {task!r}" for task in leaked)
    pytest.fail(f"{len(leaked)} asyncio task(s) still pending after the test:\n{described}")


# -- modes ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Mode:
    """How a test's channel reaches the server."""

    name: str
    tunneled: bool
    #: Flow control off at the *tunnel* client / tunnel server (for a reverse
    #: tunnel the tunnel client is the network server).
    client_disables_flow_control: bool = False
    server_disables_flow_control: bool = False
    #: "forward", "reverse", "reverse-in-forward" or "forward-in-reverse".
    kind: str = "forward"

    def __str__(self) -> str:
        return self.name


DIRECT = Mode("direct", tunneled=False)
FORWARD = Mode("forward-fc", tunneled=True)
MODES = (
    DIRECT,
    FORWARD,
    Mode("forward-nofc", True, True, True),
    Mode("forward-clientnofc", True, True, False),
    Mode("forward-servernofc", True, False, True),
    Mode("reverse-fc", True, kind="reverse"),
    Mode("reverse-nofc", True, True, True, kind="reverse"),
    Mode("reverse-in-forward", True, kind="reverse-in-forward"),
    Mode("forward-in-reverse", True, kind="forward-in-reverse"),
)


@pytest.fixture(params=MODES, ids=str)
def mode(request: pytest.FixtureRequest) -> Mode:
    """The channel mode; tests using ``channel`` run once per mode."""
    result: Mode = request.param
    return result


# -- servers --------------------------------------------------------------------------


def _listening_socket() -> socket.socket:
    # IPPROTO_TCP, not the default 0: asyncio only sets TCP_NODELAY on accepted
    # connections when the listening socket says TCP explicitly; without it
    # every call waits on delayed ACKs (GRPCLIB-NOTES 11).
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        sock.bind(("127.0.0.1", 0))
    except BaseException:
        sock.close()
        raise
    return sock


class StartServer:
    """A factory: ``port = await start_server(services, tunnel_options=...)``.

    Starts a grpclib server on 127.0.0.1 (port 0) serving *services* and, when
    *tunnel_options* is given, also ``tunnel.TunnelServiceHandler(services,
    options=tunnel_options)``, so the same services answer directly and inside
    forward tunnels, and reverse tunnels are accepted. With *inner_reverse*,
    the forward tunnels also carry a second ``TunnelServiceHandler`` that
    accepts reverse tunnels opened *inside* a forward tunnel.
    """

    def __init__(self) -> None:
        self.servers: list[grpclib.server.Server] = []
        #: The tunnel handler of each server, by port.
        self.tunnel_handlers: dict[int, tunnel.TunnelServiceHandler] = {}
        #: The handler for reverse tunnels nested in forward ones, by port.
        self.inner_handlers: dict[int, tunnel.TunnelServiceHandler] = {}

    async def __call__(
        self,
        services: Iterable[Any],
        *,
        tunnel_options: tunnel.TunnelOptions | None = None,
        inner_reverse: bool = False,
    ) -> int:
        services = list(services)
        handlers: list[Any] = list(services)
        tunnel_handler = inner = None
        if tunnel_options is not None:
            tunneled = list(services)
            if inner_reverse:
                inner = tunnel.TunnelServiceHandler(options=tunnel_options)
                tunneled.append(inner)
            tunnel_handler = tunnel.TunnelServiceHandler(tunneled, options=tunnel_options)
            handlers.append(tunnel_handler)
        server = grpclib.server.Server(handlers)
        sock = _listening_socket()
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            raise
        self.servers.append(server)
        port: int = sock.getsockname()[1]
        if tunnel_handler is not None:
            self.tunnel_handlers[port] = tunnel_handler
        if inner is not None:
            self.inner_handlers[port] = inner
        return port


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """See :class:`StartServer`; every server is closed when the test ends."""
    start = StartServer()
    yield start
    for server in start.servers:
        server.close()
    async with asyncio.timeout(FIXTURE_TIMEOUT):
        for server in start.servers:
            await server.wait_closed()


def make_tunnel_options(*, disable_flow_control: bool) -> tunnel.TunnelOptions:
    return tunnel.TunnelOptions(disable_flow_control=disable_flow_control)


def server_tunnel_options(mode: Mode) -> tunnel.TunnelOptions:
    """The tunnel handler options a server for *mode* uses.

    The ``direct`` mode's server serves the tunnel handler too (with default
    options), so that every mode talks to the same kind of server. For a
    reverse tunnel the network server is the tunnel *client*.
    """
    disable = (
        mode.client_disables_flow_control
        if mode.kind == "reverse"
        else mode.server_disables_flow_control
    )
    return make_tunnel_options(disable_flow_control=disable)


@pytest.fixture
async def server(start_server: StartServer, mode: Mode) -> int:
    """Port of a server serving :class:`TestService` directly and in tunnels."""
    return await start_server(
        [TestService()],
        tunnel_options=server_tunnel_options(mode),
        inner_reverse=mode.kind == "reverse-in-forward",
    )


# -- channels -------------------------------------------------------------------------


async def _hold_open(
    context: contextlib.AbstractAsyncContextManager[T], stack: contextlib.AsyncExitStack
) -> T:
    """Enter *context* in a task of its own, exited when *stack* closes.

    Entering and exiting happen in that one task, as they would in user code,
    regardless of which tasks pytest-asyncio runs the fixture's halves in.
    """
    entered: asyncio.Future[T] = asyncio.get_running_loop().create_future()
    release = asyncio.Event()

    async def hold() -> None:
        try:
            async with context as value:
                entered.set_result(value)
                await release.wait()
        except BaseException as exc:
            if entered.done():
                raise
            if isinstance(exc, asyncio.CancelledError):
                entered.cancel()
            else:
                entered.set_exception(exc)

    task = asyncio.create_task(hold(), name=f"hold {context!r}")

    async def close() -> None:
        release.set()
        async with asyncio.timeout(FIXTURE_TIMEOUT):
            await task

    stack.push_async_callback(close)
    async with asyncio.timeout(FIXTURE_TIMEOUT):
        return await asyncio.shield(entered)


@contextlib.asynccontextmanager
async def reverse_tunnel(
    channel: grpclib.client.Channel,
    services: Iterable[Any],
    handler: tunnel.TunnelServiceHandler,
    options: tunnel.TunnelOptions,
    metadata: dict[str, str] | None = None,
) -> AsyncIterator[tunnel.ReverseChannel]:
    """Serve *services* over a reverse tunnel to *handler*'s server.

    Yields the server side's ``ReverseChannel`` of all its reverse tunnels,
    once this tunnel is in it; closes the tunnel on exit.
    """
    device = tunnel.ReverseTunnelServer(channel, list(services), options=options)
    serving = asyncio.create_task(device.serve(metadata), name="reverse tunnel")
    reverse_channel = handler.as_channel()
    ready = asyncio.create_task(reverse_channel.wait_ready())
    try:
        async with asyncio.timeout(FIXTURE_TIMEOUT):
            await asyncio.wait({serving, ready}, return_when=asyncio.FIRST_COMPLETED)
        if serving.done():
            serving.result()  # the tunnel could not be opened: raise why
            raise AssertionError("reverse tunnel ended before it was ready")
        yield reverse_channel
    finally:
        ready.cancel()
        device.close()
        async with asyncio.timeout(FIXTURE_TIMEOUT):
            await asyncio.gather(serving, ready, return_exceptions=True)


OpenChannel = Callable[..., Awaitable[grpclib.client.Channel]]


@pytest.fixture
async def open_channel(start_server: StartServer) -> AsyncIterator[OpenChannel]:
    """A factory: ``channel = await open_channel(port, mode)``.

    ``direct`` gives a grpclib channel to 127.0.0.1:port; a forward mode gives
    a tunnel channel over a fresh grpclib channel, with the mode's client-side
    flow-control setting. Everything is closed when the test ends, the
    tunnels before the channels they run over, and all of them before the
    servers (hence the dependency on ``start_server``: grpclib's
    ``Server.close()`` does not end open calls, so a tunnel still open then
    would hang).
    """
    async with contextlib.AsyncExitStack() as stack:

        async def open_(port: int, mode: Mode = DIRECT) -> grpclib.client.Channel:
            direct = grpclib.client.Channel("127.0.0.1", port)
            stack.callback(direct.close)
            if not mode.tunneled:
                return direct
            if mode.kind == "reverse":
                device = tunnel.TunnelOptions(
                    disable_flow_control=mode.server_disables_flow_control
                )
                handler = start_server.tunnel_handlers[port]
                return await _hold_open(
                    reverse_tunnel(direct, [TestService()], handler, device), stack
                )
            if mode.kind == "reverse-in-forward":
                outer = await _hold_open(tunnel.open_tunnel(direct), stack)
                handler = start_server.inner_handlers[port]
                return await _hold_open(
                    reverse_tunnel(outer, [TestService()], handler, tunnel.TunnelOptions()), stack
                )
            if mode.kind == "forward-in-reverse":
                handler = start_server.tunnel_handlers[port]
                device_services = [tunnel.TunnelServiceHandler([TestService()])]
                reverse = await _hold_open(
                    reverse_tunnel(direct, device_services, handler, tunnel.TunnelOptions()), stack
                )
                tunneled = await _hold_open(tunnel.open_tunnel(reverse), stack)
                assert isinstance(tunneled, tunnel.TunnelChannel)
                return tunneled
            options = make_tunnel_options(disable_flow_control=mode.client_disables_flow_control)
            tunneled = await _hold_open(tunnel.open_tunnel(direct, options=options), stack)
            # A test that silently fell back to a direct channel would prove nothing.
            assert isinstance(tunneled, tunnel.TunnelChannel)
            return tunneled

        yield open_


@pytest.fixture
async def channel(open_channel: OpenChannel, server: int, mode: Mode) -> grpclib.client.Channel:
    """A channel of the test's mode to the :func:`server`."""
    return await open_channel(server, mode)


@pytest.fixture
async def direct_channel(open_channel: OpenChannel, server: int) -> grpclib.client.Channel:
    """A plain grpclib channel to the same :func:`server`: the control group."""
    return await open_channel(server, DIRECT)
