"""``python -m tunnel.testing.backend``: TestService as a plain gRPC server.

The backend of the router demo (``make demo``), the programs' tests and
their benchmark: ``grpchantesting.TestService`` and ``grpc.health.v1.Health``
on a grpclib server, no tunnel at all.  It prints ``listening HOST:PORT``
on stdout once it serves (``--listen 127.0.0.1:0`` picks a free port) and
runs until SIGTERM/SIGINT.

With ``--events`` it also prints one JSON object per line on stdout for
every call it starts (``{"event": "call", "method", "id", "deadline"}``:
``id`` is the call's ``x-call-id`` header, ``deadline`` the seconds left
when it arrived or null) and for every call whose handler was cancelled
(``{"event": "cancelled", "method", "id"}``), so a test in another process
can see what reached the backend.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import socket
import sys
from collections.abc import Mapping
from typing import Any

import grpclib.server
from grpclib.const import Handler
from grpclib.health.service import Health

from tunnel.testing.service import TestService

__all__ = ["Observed", "main", "serve_until_stopped"]

CALL_ID_HEADER = "x-call-id"


def _emit(document: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(document) + "\n")
    sys.stdout.flush()


class Observed:
    """A service whose calls are reported on stdout as they start and get cancelled."""

    def __init__(self, service: Any) -> None:
        self._service = service

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            name: Handler(_observed(name, handler.func), *handler[1:])
            for name, handler in self._service.__mapping__().items()
        }


def _observed(method: str, func: Any) -> Any:
    async def handle(stream: grpclib.server.Stream[Any, Any]) -> None:
        call_id = stream.metadata.get(CALL_ID_HEADER) if stream.metadata else None
        deadline = stream.deadline.time_remaining() if stream.deadline else None
        _emit({"event": "call", "method": method, "id": call_id, "deadline": deadline})
        try:
            await func(stream)
        except asyncio.CancelledError:
            _emit({"event": "cancelled", "method": method, "id": call_id})
            raise

    return handle


async def serve(host: str, port: int, events: bool) -> None:
    service: Any = TestService()
    await serve_until_stopped([Observed(service) if events else service, Health()], host, port)


async def serve_until_stopped(services: list[Any], host: str, port: int) -> None:
    """Serve ``services``, print ``listening HOST:PORT``, stop on SIGTERM/SIGINT."""
    server = grpclib.server.Server(services)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.bind((host, port))
    await server.start(sock=sock)
    sys.stdout.write(f"listening {host}:{sock.getsockname()[1]}\n")
    sys.stdout.flush()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    await stop.wait()
    server.close()
    await server.wait_closed()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m tunnel.testing.backend", description=__doc__)
    parser.add_argument("--listen", default="127.0.0.1:0", help="HOST:PORT (default: %(default)s)")
    parser.add_argument("--events", action="store_true", help="report calls on stdout")
    args = parser.parse_args()
    host, _, port = args.listen.rpartition(":")
    if not host or not port.isdigit():
        parser.error(f"--listen {args.listen!r} is not HOST:PORT")
    try:
        asyncio.run(serve(host, int(port), args.events))
    except OSError as exc:
        sys.exit(f"python -m tunnel.testing.backend: --listen {args.listen}: {exc.strerror or exc}")


if __name__ == "__main__":
    main()
