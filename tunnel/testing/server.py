"""``python -m tunnel.testing.server``: stands in for the reference's ``tunneltestsvr``.

Listens on 127.0.0.1 only (``--port``, default 26354) and serves, on the
plain grpclib server:

- ``grpctunnel.v1.TunnelService`` (a :class:`tunnel.TunnelServiceHandler`):
  forward tunnels reach ``grpchantesting.TestService``; reverse tunnels are
  grouped by affinity key = the first ``test-client-key`` request header of
  the ``OpenReverseTunnel`` call (``""`` if absent);
- ``TunnelTestService``: ``TriggerTestRPCs{client_key}`` waits up to 1 s for
  a reverse tunnel with that key, then runs the reference's load over the
  reverse tunnels with that key and returns (or fails with the first error).

Logs ``Listening on 127.0.0.1:N`` and ``Sending RPCs over reverse tunnel to
<key>`` on stderr, and runs until interrupted (SIGINT/SIGTERM: exit 0). A
port it cannot listen on is fatal (exit 1). ``--no-flow-control`` makes the
tunnels offer only protocol revision zero. ``--duration`` (not in the
reference) shortens the load of each trigger, for quick tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import socket
import sys
from collections.abc import Sequence

from grpclib.const import Status
from grpclib.exceptions import GRPCError
from grpclib.server import Server

from tunnel import TunnelChannel, TunnelOptions, TunnelServiceHandler
from tunnel.testing._cli import DEFAULT_PORT, GoArgumentParser, describe_error, fatal, log
from tunnel.testing._load import DEFAULT_DURATION, send_rpcs
from tunnel.testing._pb import (
    TriggerTestRpCsRequest,
    TriggerTestRpCsResponse,
    TunnelTestServiceBase,
)
from tunnel.testing.service import TestService

__all__ = ["CLIENT_KEY_HEADER", "TunnelTester", "client_key", "main"]

#: The request header whose first value is a reverse tunnel's affinity key.
CLIENT_KEY_HEADER = "test-client-key"
#: How long TriggerTestRPCs waits for the client's reverse tunnel.
WAIT_FOR_TUNNEL = 1.0


def client_key(channel: TunnelChannel) -> str:
    """The affinity key of a reverse tunnel: its first ``test-client-key`` header."""
    value = channel.metadata.get(CLIENT_KEY_HEADER, "")
    return value if isinstance(value, str) else value.decode("utf-8", "replace")


class TunnelTester(TunnelTestServiceBase):
    """``TunnelTestService``: sends the load back over a client's reverse tunnel."""

    def __init__(self, handler: TunnelServiceHandler, *, duration: float = DEFAULT_DURATION):
        self._handler = handler
        self._duration = duration

    async def trigger_test_rp_cs(
        self, trigger_test_rp_cs_request: TriggerTestRpCsRequest
    ) -> TriggerTestRpCsResponse:
        key: str = trigger_test_rp_cs_request.client_key
        channel = self._handler.key_as_channel(key)
        try:
            async with asyncio.timeout(WAIT_FOR_TUNNEL):
                await channel.wait_ready()
        except TimeoutError:
            raise GRPCError(
                Status.DEADLINE_EXCEEDED,
                f"no reverse tunnel with key {key!r} within {WAIT_FOR_TUNNEL:g} s",
            ) from None
        log(f"Sending RPCs over reverse tunnel to {key}")
        try:
            await send_rpcs(channel, duration=self._duration)
        except GRPCError:
            raise
        except Exception as exc:
            raise GRPCError(Status.UNKNOWN, describe_error(exc)) from None
        return TriggerTestRpCsResponse()


def _listen(port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    try:
        # As Go's net.Listen does; a port with a live listener still fails.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except OSError as exc:
        sock.close()
        reason = (exc.strerror or str(exc)).lower()
        fatal(f"listen tcp 127.0.0.1:{port}: bind: {reason}")
    return sock


async def serve(port: int, *, disable_flow_control: bool, duration: float) -> None:
    """Serve until SIGINT or SIGTERM."""
    options = TunnelOptions(disable_flow_control=disable_flow_control)
    handler = TunnelServiceHandler([TestService()], affinity_key=client_key, options=options)
    server = Server([handler, TunnelTester(handler, duration=duration)])
    sock = _listen(port)
    try:
        await server.start(sock=sock)
    except BaseException:
        sock.close()
        raise
    host, bound_port = sock.getsockname()[:2]
    log(f"Listening on {host}:{bound_port}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        for signum in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(signum)
        handler.initiate_shutdown()
        server.close()
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(options.close_timeout):
                await server.wait_closed()


def main(argv: Sequence[str] | None = None) -> None:
    parser = GoArgumentParser("A test server for tunnels (the reference's tunneltestsvr).")
    parser.add_flag(
        "port", type=int, default=DEFAULT_PORT, help="the port on which this server will listen"
    )
    parser.add_flag("no-flow-control", action="store_true", help="disables flow control")
    parser.add_flag(
        "duration",
        type=float,
        default=DEFAULT_DURATION,
        help="seconds each TriggerTestRPCs load runs (the reference: 5)",
    )
    args = parser.parse_args(argv)
    try:
        asyncio.run(
            serve(args.port, disable_flow_control=args.no_flow_control, duration=args.duration)
        )
    except SystemExit:
        raise
    except BaseException as exc:
        fatal(describe_error(exc))


if __name__ == "__main__":
    main(sys.argv[1:])
