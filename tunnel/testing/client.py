"""``python -m tunnel.testing.client``: stands in for the reference's ``tunneltestclient``.

Dials 127.0.0.1 (``--server-port``, default 26354; a blocking dial with a
5 s limit) and, by ``--tunnel-type`` (``forward``, ``reverse`` or ``both``,
the default):

- forward: opens a forward tunnel (``Tunnel created.``), runs the reference's
  load through it and logs ``Issued <n> requests over tunnel.``;
- reverse: makes a random key (32 random bytes as hex), opens a reverse
  tunnel serving ``grpchantesting.TestService`` with request header
  ``test-client-key: <key>`` (``Reverse tunnel started (key = <key>).``),
  calls ``TunnelTestService/TriggerTestRPCs{client_key: <key>}`` on the plain
  connection, and when it returns logs ``Served <n> requests over reverse
  tunnel.`` (calls its test service received).

Exit status 0 on success; any failure is logged and exits 1. ``--duration``
(not in the reference) shortens the forward load, for quick tests.
"""

from __future__ import annotations

import asyncio
import contextlib
import secrets
import sys
from collections.abc import Sequence

import grpclib.client
from grpclib.events import RecvRequest, listen

from tunnel import ReverseTunnelServer, TunnelOptions, open_tunnel
from tunnel.testing._cli import (
    DEFAULT_PORT,
    GoArgumentParser,
    describe_error,
    dial,
    fatal,
    go_quote,
    log,
)
from tunnel.testing._load import DEFAULT_DURATION, send_rpcs
from tunnel.testing._pb import TriggerTestRpCsRequest, TunnelTestServiceStub
from tunnel.testing.server import CLIENT_KEY_HEADER
from tunnel.testing.service import TestService

__all__ = ["TUNNEL_TYPES", "main", "run"]

TUNNEL_TYPES = ("forward", "reverse", "both")


async def run_forward(
    channel: grpclib.client.Channel, options: TunnelOptions, *, duration: float
) -> int:
    """The forward part; returns the number of calls issued over the tunnel."""
    async with open_tunnel(channel, options=options) as tunnel_channel:
        log("Tunnel created.")
        stats = await send_rpcs(tunnel_channel, duration=duration)
    log(f"Issued {stats.total} requests over tunnel.")
    return stats.total


async def run_reverse(channel: grpclib.client.Channel, options: TunnelOptions) -> int:
    """The reverse part; returns the number of calls served over the reverse tunnel."""
    key = secrets.token_hex(32)
    reverse_server = ReverseTunnelServer(channel, [TestService()], options=options)
    served = 0

    async def count(_: RecvRequest) -> None:
        nonlocal served
        served += 1

    listen(reverse_server, RecvRequest, count)
    serving = asyncio.create_task(reverse_server.serve(metadata={CLIENT_KEY_HEADER: key}))
    try:
        log(f"Reverse tunnel started (key = {key}).")
        trigger = asyncio.ensure_future(
            TunnelTestServiceStub(channel).trigger_test_rp_cs(
                TriggerTestRpCsRequest(client_key=key)
            )
        )
        try:
            # Like the reference, a reverse tunnel that cannot be opened is
            # fatal at once, even while the trigger call is still waiting.
            await asyncio.wait({trigger, serving}, return_when=asyncio.FIRST_COMPLETED)
            if serving.done() and not trigger.done():
                await serving  # raises why the tunnel failed; else the trigger decides
            await trigger
        finally:
            trigger.cancel()
            with contextlib.suppress(BaseException):
                await trigger
    finally:
        # The reference cancels the OpenReverseTunnel call here (its context),
        # so no network server can keep the client waiting for the call's end.
        reverse_server.close()
        serving.cancel()
        with contextlib.suppress(Exception, asyncio.CancelledError):
            await serving
    log(f"Served {served} requests over reverse tunnel.")
    return served


async def run(port: int, *, tunnel_type: str, disable_flow_control: bool, duration: float) -> None:
    """Everything the program does after parsing its flags."""
    options = TunnelOptions(disable_flow_control=disable_flow_control)
    channel = await dial("127.0.0.1", port)
    try:
        if tunnel_type != "reverse":
            await run_forward(channel, options, duration=duration)
        if tunnel_type != "forward":
            await run_reverse(channel, options)
    finally:
        channel.close()


def main(argv: Sequence[str] | None = None) -> None:
    parser = GoArgumentParser("A test client for tunnels (the reference's tunneltestclient).")
    parser.add_flag(
        "server-port",
        type=int,
        default=DEFAULT_PORT,
        help="the port on which the server is listening",
    )
    parser.add_flag("no-flow-control", action="store_true", help="disables flow control")
    parser.add_flag(
        "tunnel-type",
        default="both",
        help='type of tunnel to test, can be "forward", "reverse", or "both"',
    )
    parser.add_flag(
        "duration",
        type=float,
        default=DEFAULT_DURATION,
        help="seconds the forward load runs (the reference: 5)",
    )
    args = parser.parse_args(argv)
    if args.tunnel_type not in TUNNEL_TYPES:
        fatal(
            f"tunnel type {go_quote(args.tunnel_type)} is not valid; "
            'must be one of "forward", "reverse", or "both"'
        )
    try:
        asyncio.run(
            run(
                args.server_port,
                tunnel_type=args.tunnel_type,
                disable_flow_control=args.no_flow_control,
                duration=args.duration,
            )
        )
    except KeyboardInterrupt:
        fatal("interrupted")
    except Exception as exc:
        fatal(describe_error(exc))


if __name__ == "__main__":
    main(sys.argv[1:])
