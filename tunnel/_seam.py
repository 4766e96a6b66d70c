"""Every place this package reaches into grpclib's private parts.

grpclib has no public API for a few things a tunnel needs.  Each such touch
lives in this module, as a small function whose docstring says what it
relies on and why no public API does the job, so a grpclib release that
moves one of them breaks here, by name, and nowhere else.
``tests/test_seam.py`` checks that each of them still exists and behaves as
assumed.

The touches, one line each (keep this list in step with the code):

* ``Stream._stream`` (client and server): the HTTP/2 stream under a call,
  and through it ``.connection`` (grpclib's ``protocol.Connection``) and
  ``._transport`` (the asyncio transport).
* ``protocol.Connection.is_closing()``: whether the connection is gone.
* ``asyncio.Transport.abort()`` on that transport: cut a dead connection.
* ``protocol.Connection._connection`` (the ``h2`` connection), its
  ``ping()``, ``Connection.flush()``, and ``Connection.ping_ack_process``
  (called by grpclib for every PING ACK): an HTTP/2 PING and its answer.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["abort_connection", "connection_is_lost", "http2_pinger"]


def _connection(call: Any) -> Any:
    """grpclib's ``protocol.Connection`` under a call, or None.

    grpclib's client and server ``Stream`` keep their HTTP/2 stream in
    ``_stream`` and it keeps its connection in ``connection``.  A tunneled
    call (a stream of this package) has neither.
    """
    return getattr(getattr(call, "_stream", None), "connection", None)


def connection_is_lost(call: Any) -> bool:
    """True if the connection under a grpclib call is closed or closing.

    grpclib cancels a server handler both when its connection is lost and
    when its ``Server`` closes, and offers no public way to tell which.
    """
    connection = _connection(call)
    return connection is not None and bool(connection.is_closing())


def abort_connection(call: Any) -> None:
    """Cut the connection under a grpclib call at once, without a goodbye.

    For a peer that stopped answering: ``Channel.close()`` would only close
    the transport, which waits for unsent data to drain to a peer that
    takes none; ``abort()`` does not wait.  The channel then dials a new
    connection for its next call.  A tunneled call has no connection of
    its own; its tunnel's keepalive looks after the one under it.
    """
    transport = getattr(getattr(call, "_stream", None), "_transport", None)
    if transport is not None:
        transport.abort()


def http2_pinger(call: Any) -> Callable[[], Awaitable[None]] | None:
    """A function that pings the connection under a grpclib call, or None.

    Each call of the function sends an HTTP/2 PING and returns once an ACK
    arrives.  grpclib sends PINGs only for its own keepalive, configured
    through private fields for a whole server, and tells nobody about ACKs
    except its ``Connection.ping_ack_process``; so the connection's method
    is wrapped, once, to also wake our waiters.  Any ACK will do: a peer
    that acknowledges anything is alive.
    """
    connection = _connection(call)
    if connection is None or not hasattr(connection, "ping_ack_process"):
        return None
    waiters: list[asyncio.Future[None]] | None = getattr(connection, "_tunnel_ping_waiters", None)
    if waiters is None:
        waiters = []
        acknowledged = connection.ping_ack_process

        def ping_ack_process() -> None:
            acknowledged()
            assert waiters is not None
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(None)
            waiters.clear()

        connection.ping_ack_process = ping_ack_process
        connection._tunnel_ping_waiters = waiters

    async def ping() -> None:
        assert waiters is not None
        waiter = asyncio.get_running_loop().create_future()
        waiters.append(waiter)
        try:
            connection._connection.ping(os.urandom(8))
            connection.flush()
            await waiter
        finally:
            if waiter in waiters:
                waiters.remove(waiter)

    return ping
