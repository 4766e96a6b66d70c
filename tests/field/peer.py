"""A tunnel peer in a process of its own, for tests that kill it with SIGKILL.

``python -m tests.field.peer server [--port N]``: a network server on
127.0.0.1 (port 0 unless given) serving ``Device("server")`` directly, in
forward tunnels, and accepting reverse tunnels keyed by ``x-key``.  Prints
``listening N`` on stdout once it accepts connections.

``python -m tests.field.peer device --port N --key K``: a device that keeps a
reverse tunnel to 127.0.0.1:N open with ``serve_forever``, serving
``Device(K)``.  Prints ``connected`` on stdout each time its tunnel opens.

Both use short keepalive settings so that the tests stay quick, and run
until killed.
"""

from __future__ import annotations

import argparse
import asyncio
import socket

import grpclib.client
import grpclib.server

import tunnel
from tests.reverse.support import Device, key_from_metadata

OPTIONS = tunnel.TunnelOptions(keepalive_interval=1.0, keepalive_timeout=1.0, close_timeout=1.0)


async def server(port: int) -> None:
    handler = tunnel.TunnelServiceHandler(
        [Device("server")], affinity_key=key_from_metadata, options=OPTIONS
    )
    grpc_server = grpclib.server.Server([Device("server"), handler])
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", port))
    await grpc_server.start(sock=sock)
    print(f"listening {sock.getsockname()[1]}", flush=True)
    await asyncio.Event().wait()


async def device(port: int, key: str) -> None:
    channel = grpclib.client.Channel("127.0.0.1", port)
    device = tunnel.ReverseTunnelServer(channel, [Device(key)], options=OPTIONS)
    await device.serve_forever(
        {"x-key": key},
        min_backoff=0.05,
        max_backoff=0.2,
        on_connected=lambda: print("connected", flush=True),
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("role", choices=["server", "device"])
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--key", default="device")
    args = parser.parse_args()
    if args.role == "server":
        asyncio.run(server(args.port))
    else:
        asyncio.run(device(args.port, args.key))


if __name__ == "__main__":
    main()
