"""What the interop programs share: Go-style logging, flags and failure.

The reference's programs use Go's ``log`` package (stderr, a
``YYYY/MM/DD HH:MM:SS`` prefix, ``log.Fatal`` = print and exit 1) and Go's
``flag`` package (``-port 5`` and ``--port=5`` alike). Ours log the same way
and accept both flag spellings, so a script written for one runs the other.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from typing import NoReturn

import grpclib.client
from grpclib.exceptions import GRPCError

__all__ = [
    "DEFAULT_PORT",
    "DialError",
    "GoArgumentParser",
    "describe_error",
    "dial",
    "fatal",
    "log",
]

#: The reference programs' default port.
DEFAULT_PORT = 26354
#: The reference client dials with a 5 s limit.
DIAL_TIMEOUT = 5.0
_DIAL_RETRY = 0.05


class DialError(ConnectionError):
    """The server could not be reached within the dial time limit."""


def log(message: str) -> None:
    """Print *message* as Go's ``log.Println`` does: stderr, date/time prefix."""
    sys.stderr.write(f"{time.strftime('%Y/%m/%d %H:%M:%S')} {message}\n")
    sys.stderr.flush()


def fatal(message: str) -> NoReturn:
    """Go's ``log.Fatal``: log *message* and exit with status 1."""
    log(message)
    raise SystemExit(1)


def go_quote(value: str) -> str:
    """A string quoted as Go's ``%q`` quotes it (close enough for flag values)."""
    return json.dumps(value, ensure_ascii=False)


def describe_error(error: BaseException) -> str:
    """An error as the reference would print it (gRPC statuses as grpc-go does)."""
    if isinstance(error, GRPCError):
        code = "".join(part.capitalize() for part in error.status.name.split("_"))
        if code == "Ok":
            code = "OK"
        return f"rpc error: code = {code} desc = {error.message or ''}"
    text = str(error)
    if isinstance(error, DialError):
        return text
    return f"{type(error).__name__}: {text}" if text else type(error).__name__


class GoArgumentParser(argparse.ArgumentParser):
    """An argparse parser whose options also answer to Go's single-dash spelling."""

    def __init__(self, description: str) -> None:
        super().__init__(description=description, allow_abbrev=False)

    def add_flag(self, name: str, **kwargs: object) -> None:
        """Add ``--name`` and its Go spelling ``-name``."""
        self.add_argument(f"--{name}", f"-{name}", **kwargs)  # type: ignore[arg-type]


async def dial(host: str, port: int, *, timeout: float = DIAL_TIMEOUT) -> grpclib.client.Channel:
    """A connected channel to *host*:*port*, like grpc-go's blocking dial.

    Connection attempts repeat until one succeeds or *timeout* seconds pass,
    so a server that is still starting is waited for.
    """
    channel = grpclib.client.Channel(host, port)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        try:
            async with asyncio.timeout(max(deadline - loop.time(), 0.001)):
                await channel.__connect__()
            return channel
        except (OSError, TimeoutError) as exc:
            if loop.time() + _DIAL_RETRY >= deadline:
                channel.close()
                reason = str(exc) or "context deadline exceeded"
                raise DialError(f"dial tcp {host}:{port}: {reason}") from None
            await asyncio.sleep(_DIAL_RETRY)
