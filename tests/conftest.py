"""Shared fixtures: a leak check, real grpclib servers, and channels by mode.

Every integration test runs against a real ``grpclib.server.Server`` on
127.0.0.1 with a kernel-chosen port, and reaches it through a channel of one
*mode*:

- ``direct``: a plain ``grpclib.client.Channel`` (the control group);
- ``forward-*``: a forward tunnel opened over such a channel, with flow
  control on both sides (``fc``), off on both (``nofc``), or off on only one
  side (``clientnofc``, ``servernofc``: the two ends must then agree on
  protocol revision zero during negotiation).

pytest-asyncio runs a fixture's setup, the test, and the fixture's teardown
in three different tasks. Anything that must be entered and exited in one
task (a tunnel's ``async with``) is therefore held open by a task the fixture
owns; see :func:`_hold_open`.
"""

from __future__ import annotations

import asyncio
import contextlib
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
    client_disables_flow_control: bool = False
    server_disables_flow_control: bool = False

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


StartServer = Callable[..., Awaitable[int]]


@pytest.fixture
async def start_server() -> AsyncIterator[StartServer]:
    """A factory: ``port = await start_server(services, tunnel_options=...)``.

    Starts a grpclib server on 127.0.0.1 (port 0) serving *services* and, when
    *tunnel_options* is given, also ``tunnel.TunnelServiceHandler(services,
    options=tunnel_options)``, so the same services answer directly and inside
    forward tunnels. Every server is closed when the test ends.
    """
    servers: list[grpclib.server.Server] = []

    async def start(
        services: Iterable[Any], *, tunnel_options: tunnel.TunnelOptions | None = None
    ) -> int:
        services = list(services)
        handlers: list[Any] = list(services)
        if tunnel_options is not None:
            handlers.append(tunnel.TunnelServiceHandler(services, options=tunnel_options))
        server = grpclib.server.Server(handlers)
        sock = _listening_socket()
        try:
            await server.start(sock=sock)
        except BaseException:
            sock.close()
            raise
        servers.append(server)
        port: int = sock.getsockname()[1]
        return port

    yield start
    for server in servers:
        server.close()
    async with asyncio.timeout(FIXTURE_TIMEOUT):
        for server in servers:
            await server.wait_closed()


def make_tunnel_options(*, disable_flow_control: bool) -> tunnel.TunnelOptions:
    return tunnel.TunnelOptions(disable_flow_control=disable_flow_control)


def server_tunnel_options(mode: Mode) -> tunnel.TunnelOptions:
    """The tunnel handler options a server for *mode* uses.

    The ``direct`` mode's server serves the tunnel handler too (with default
    options), so that every mode talks to the same kind of server.
    """
    return make_tunnel_options(disable_flow_control=mode.server_disables_flow_control)


@pytest.fixture
async def server(start_server: StartServer, mode: Mode) -> int:
    """Port of a server serving :class:`TestService` directly and in tunnels."""
    return await start_server([TestService()], tunnel_options=server_tunnel_options(mode))


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
    del start_server  # only needed for the teardown order
    async with contextlib.AsyncExitStack() as stack:

        async def open_(port: int, mode: Mode = DIRECT) -> grpclib.client.Channel:
            direct = grpclib.client.Channel("127.0.0.1", port)
            stack.callback(direct.close)
            if not mode.tunneled:
                return direct
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
