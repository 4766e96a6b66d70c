"""The reference's interop load: ``internal.SendRPCs`` of jhump/grpctunnel.

Four loops run at once against ``grpchantesting.TestService`` through one
channel, each repeating one kind of call until the load stops (shared/INTEROP.md,
"The load"):

- Unary: ``{count: 10, payload: 00 01 02 03 x 100}`` (400 bytes);
- ClientStream: 10 requests ``{count: 10, payload: 00 01 02 03 x 10000}``
  (40,000 bytes each), then half-close and read the reply;
- ServerStream: ``{count: 10, payload: 00 01 02 03 x 1000}``, read the 10 replies;
- BidiStream: send 10 requests ``{count: 10, payload: 4,000 bytes}`` and
  half-close, while reading replies until the end.

After *duration* seconds (5 in the reference) every loop finishes the call it
is in and stops. The reference cancels the shared context one second after
that, which fails a call still running; here a call still running after the
*grace* period is cancelled and the load fails the same way. The first call
that fails stops the other loops (``errgroup``) and is the load's error.

Every call runs on the caller's channel with plain grpclib streams, so the
channel can be a direct one, a tunnel or a pool of reverse tunnels.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

import grpclib.client
from grpclib.const import Cardinality

from tunnel.testing._pb.grpchantesting import Message

__all__ = ["DEFAULT_DURATION", "GRACE", "LoadError", "LoadStats", "send_rpcs"]

#: How long the reference's load runs, in seconds.
DEFAULT_DURATION = 5.0
#: How long calls still running when the load stops may take to finish.
GRACE = 1.0

_PREFIX = "/grpchantesting.TestService/"
_PATTERN = bytes([0, 1, 2, 3])
UNARY_REQUEST = Message(count=10, payload=_PATTERN * 100)
CLIENT_STREAM_REQUEST = Message(count=10, payload=_PATTERN * 10000)
SERVER_STREAM_REQUEST = Message(count=10, payload=_PATTERN * 1000)
BIDI_REQUEST = Message(count=10, payload=_PATTERN * 1000)
#: Requests per client-streaming and bidi call, replies per server-streaming call.
MESSAGES_PER_STREAM = 10


class LoadError(Exception):
    """The load failed: a call failed, or calls outlived the grace period."""


@dataclass
class LoadStats:
    """How many calls of each kind the load started (the reference counts calls)."""

    calls: dict[str, int] = field(
        default_factory=lambda: dict.fromkeys(
            ("unary", "client_stream", "server_stream", "bidi"), 0
        )
    )

    @property
    def total(self) -> int:
        return sum(self.calls.values())


async def _unary(channel: grpclib.client.Channel) -> None:
    async with channel.request(
        _PREFIX + "Unary", Cardinality.UNARY_UNARY, Message, Message
    ) as stream:
        await stream.send_message(UNARY_REQUEST, end=True)
        await stream.recv_message()
        await stream.recv_trailing_metadata()


async def _client_stream(channel: grpclib.client.Channel) -> None:
    async with channel.request(
        _PREFIX + "ClientStream", Cardinality.STREAM_UNARY, Message, Message
    ) as stream:
        for i in range(MESSAGES_PER_STREAM):
            await stream.send_message(CLIENT_STREAM_REQUEST, end=i == MESSAGES_PER_STREAM - 1)
        await stream.recv_message()
        await stream.recv_trailing_metadata()


async def _server_stream(channel: grpclib.client.Channel) -> None:
    async with channel.request(
        _PREFIX + "ServerStream", Cardinality.UNARY_STREAM, Message, Message
    ) as stream:
        await stream.send_message(SERVER_STREAM_REQUEST, end=True)
        async for _ in stream:
            pass


async def _bidi(channel: grpclib.client.Channel) -> None:
    async with channel.request(
        _PREFIX + "BidiStream", Cardinality.STREAM_STREAM, Message, Message
    ) as stream:
        await stream.send_request()

        async def send_all() -> None:
            for i in range(MESSAGES_PER_STREAM):
                await stream.send_message(BIDI_REQUEST, end=i == MESSAGES_PER_STREAM - 1)

        async with asyncio.TaskGroup() as group:
            # Sending runs beside the reading, as the reference's goroutine does.
            group.create_task(send_all())
            async for _ in stream:
                pass


_ACTIONS: dict[str, Callable[[grpclib.client.Channel], Awaitable[None]]] = {
    "unary": _unary,
    "client_stream": _client_stream,
    "server_stream": _server_stream,
    "bidi": _bidi,
}


def _first_error(group: BaseExceptionGroup[BaseException]) -> BaseException:
    error: BaseException = group
    while isinstance(error, BaseExceptionGroup):
        error = error.exceptions[0]
    return error


async def send_rpcs(
    channel: grpclib.client.Channel,
    *,
    duration: float = DEFAULT_DURATION,
    grace: float = GRACE,
) -> LoadStats:
    """Run the load on *channel* for *duration* seconds; return what was started.

    Raises the first failed call's exception (``GRPCError`` and the like), or
    :class:`LoadError` if calls were still running *grace* seconds after the
    load stopped.
    """
    stats = LoadStats()
    stop = asyncio.Event()

    async def loop(kind: str) -> None:
        action = _ACTIONS[kind]
        while not stop.is_set():
            stats.calls[kind] += 1
            await action(channel)

    async def stop_after_duration() -> None:
        await asyncio.sleep(duration)
        stop.set()

    try:
        async with asyncio.TaskGroup() as group:
            tasks = [group.create_task(loop(kind)) for kind in _ACTIONS]
            timer = group.create_task(stop_after_duration())
            await timer
            _, pending = await asyncio.wait(tasks, timeout=grace)
            if pending:
                for task in pending:
                    task.cancel()
                raise LoadError(
                    f"{len(pending)} call(s) still running {grace:g} s after the load stopped"
                )
    except BaseExceptionGroup as group_error:
        raise _first_error(group_error) from None
    return stats
