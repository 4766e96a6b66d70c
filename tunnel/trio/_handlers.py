"""Handlers written as trio code, served by the asyncio layer.

A servable (what a ``grpclib.server.Server`` takes: grpclib-generated bases,
betterproto and betterproto2 services) is turned into one whose every
handler runs as a trio task (``trio_as_aio``): one crossing per call, at its
start.  Inside, the handler awaits its stream the trio way (see
``_streams``).  Cancelling the call (the client's reset, its deadline, the
end of the tunnel) cancels the trio task; a trio handler's own cancel
scopes, nurseries and locks are its business.

A handler served directly by grpclib (not through a tunnel) gets grpclib's
own stream, whose waits are asyncio's: there each stream operation is one
crossing.
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any

import grpclib.server
from grpclib.const import Handler
from grpclib.exceptions import ProtocolError

from .._server_stream import TunnelServerStream
from .._typing import Servable
from ._bridge import hop, trio_flavoured
from ._streams import prepare_server_stream

__all__ = [
    "AsyncioHandlers",
    "TrioHandlers",
    "asyncio_handlers",
    "trio_fallback",
    "trio_handlers",
]


class _HoppingServerStream:
    """grpclib's server ``Stream``, each operation one crossing into asyncio."""

    def __init__(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        self._stream = stream

    async def recv_message(self) -> Any:
        return await hop(self._stream.recv_message)

    async def send_initial_metadata(self, **kwargs: Any) -> None:
        await hop(self._stream.send_initial_metadata, **kwargs)

    async def send_message(self, message: Any) -> None:
        await hop(self._stream.send_message, message)

    async def send_trailing_metadata(self, **kwargs: Any) -> None:
        await hop(self._stream.send_trailing_metadata, **kwargs)

    async def cancel(self) -> None:
        await hop(self._stream.cancel)

    def __aiter__(self) -> _HoppingServerStream:
        return self

    async def __anext__(self) -> Any:
        message = await self.recv_message()
        if message is None:
            raise StopAsyncIteration
        return message

    def __getattr__(self, name: str) -> Any:
        return getattr(self._stream, name)


def _trio_handler(func: Callable[[Any], Awaitable[None]]) -> Callable[[Any], Awaitable[None]]:
    async def run_tunneled(stream: TunnelServerStream[Any, Any]) -> None:
        await func(stream)
        if not stream.closed:
            # What the tunnel would do next in asyncio, done here so that the
            # status leaves with the last message, in one write: from the
            # asyncio side it would follow in a write of its own, after a
            # round through the loop (measured: about 0.7 ms a call).  A
            # handler that broke the rules is left to the tunnel to report.
            with contextlib.suppress(ProtocolError):
                await stream.send_trailing_metadata()

    tunneled = trio_flavoured(run_tunneled)
    direct = trio_flavoured(func)

    async def handle(stream: Any) -> None:
        if isinstance(stream, TunnelServerStream):
            prepare_server_stream(stream)
            await tunneled(stream)
        else:
            await direct(_HoppingServerStream(stream))

    return handle


def trio_fallback(func: Callable[..., Awaitable[None]]) -> Callable[[str, Any], Awaitable[None]]:
    """A fallback (``await fallback(method_name, stream)``) written as trio code.

    Served as a trio handler is: one trio task per call, waiting on its
    stream the trio way.
    """

    async def fallback(method_name: str, stream: Any) -> None:
        await _trio_handler(functools.partial(func, method_name))(stream)

    return fallback


class _Handlers:
    """Servables bridged for the asyncio layer, as one servable."""

    def __init__(self, servables: Collection[Servable]) -> None:
        self._servables = list(servables)

    def _bridge(self, handler: Handler) -> Handler:
        return handler

    def __mapping__(self) -> Mapping[str, Handler]:
        return {
            name: self._bridge(handler)
            for servable in self._servables
            for name, handler in servable.__mapping__().items()
        }


class TrioHandlers(_Handlers):
    """Servables whose handlers are trio code, ready for the asyncio layer."""

    def _bridge(self, handler: Handler) -> Handler:
        return handler._replace(func=_trio_handler(handler.func))


class AsyncioHandlers(_Handlers):
    """Servables whose handlers are asyncio code (grpclib's Health, say): as they are."""


def asyncio_handlers(*servables: Servable) -> AsyncioHandlers:
    """Mark servables as asyncio code, to serve them unchanged beside trio ones."""
    return AsyncioHandlers(servables)


def trio_handlers(servables: Collection[Any]) -> list[Servable]:
    """``servables`` for the asyncio layer: trio code wrapped, the rest as is.

    Already-bridged objects (``asyncio_handlers(...)``, this module's
    ``TunnelServiceHandler``, anything with an ``aio_servable``) pass
    unchanged; every other servable is trio code.
    """
    result: list[Servable] = []
    for servable in servables:
        bridged = getattr(servable, "aio_servable", None)
        if bridged is not None:
            result.append(bridged)
        elif isinstance(servable, _Handlers):
            result.append(servable)
        else:
            result.append(TrioHandlers([servable]))
    return result
