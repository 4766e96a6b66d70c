"""Fallback handlers: where the calls go that no registered handler serves.

A grpclib ``Server`` answers an unknown method with UNIMPLEMENTED, and so do
the handler registries of tunnels (``TunnelServiceHandler`` for forward
tunnels, ``ReverseTunnelServer`` on a device).  Given a *fallback*, each of
them sends every other well-formed method name (``/package.Service/Method``)
there instead, as a bidirectional stream of ``RawMessage``: the fallback
cannot know the method's cardinality or message types, and needs neither to
forward it (see ``tunnel.proxy.Proxy``, the fallback most users want).

Registered handlers always win; only names nobody registered fall back.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Mapping
from typing import Protocol

import grpclib.server
from grpclib.const import Cardinality, Handler

from . import _seam
from ._core.server import parse_method_name
from .raw import RawMessage

__all__ = [
    "Fallback",
    "FallbackMapping",
    "fallback_cardinality",
    "install_fallback",
    "with_fallback",
]

#: How every fallback call is served: the fallback does not know better.
FALLBACK_CARDINALITY = Cardinality.STREAM_STREAM


class Fallback(Protocol):
    """A handler for any method: ``await fallback(method_name, stream)``.

    ``method_name`` is the full name (``/package.Service/Method``).  The
    stream is a grpclib server stream (or a tunneled one, with the same
    API) whose messages are ``RawMessage``; the fallback ends the call as
    any grpclib handler does: returning (OK), raising ``GRPCError``, or
    calling ``stream.send_trailing_metadata(...)`` itself.
    """

    def __call__(
        self, method_name: str, stream: grpclib.server.Stream[RawMessage, RawMessage], /
    ) -> Awaitable[None]: ...


class FallbackMapping(dict[str, Handler]):
    """A method table that serves every other well-formed name with a fallback.

    It holds the registered handlers as an ordinary dict does (iterating it
    lists only them); looking up any other name, with ``get`` (grpclib's
    server) or ``[]`` (the tunnels' registries), gives a ``Handler`` that
    calls the fallback with that name.
    """

    def __init__(self, handlers: Mapping[str, Handler], fallback: Fallback) -> None:
        super().__init__(handlers)
        self.fallback = fallback

    def fallback_handler(self, name: str) -> Handler | None:
        """The handler a name nobody registered gets; None for an ill-formed one."""
        if parse_method_name(name) != name:
            return None
        return Handler(
            functools.partial(self.fallback, name), FALLBACK_CARDINALITY, RawMessage, RawMessage
        )

    def get(self, name: str, default: Handler | None = None) -> Handler | None:  # type: ignore[override]
        handler = super().get(name)
        if handler is None:
            handler = self.fallback_handler(name)
        return default if handler is None else handler

    def __missing__(self, name: str) -> Handler:
        handler = self.fallback_handler(name)
        if handler is None:
            raise KeyError(name)
        return handler


def with_fallback(handlers: dict[str, Handler], fallback: Fallback | None) -> dict[str, Handler]:
    """``handlers`` itself without a fallback, else a ``FallbackMapping``."""
    return handlers if fallback is None else FallbackMapping(handlers, fallback)


def fallback_cardinality(mapping: Mapping[str, Handler]) -> Cardinality | None:
    """How a tunnel core should accept names missing from ``mapping`` (None: refuse)."""
    return FALLBACK_CARDINALITY if isinstance(mapping, FallbackMapping) else None


def install_fallback(server: grpclib.server.Server, fallback: Fallback) -> None:
    """Send every method ``server`` does not serve itself to ``fallback``.

    Call it before ``server.start()`` (a ``RuntimeError`` otherwise).  The
    server's own handlers, a ``TunnelServiceHandler`` among them, still
    answer their methods; an ill-formed path still gets UNIMPLEMENTED.
    Server event listeners (``RecvRequest`` and the rest) fire for fallback
    calls too, with the real method name.
    """
    _seam.replace_server_mapping(server, lambda mapping: FallbackMapping(mapping, fallback))
