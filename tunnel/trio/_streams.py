"""Tunneled calls driven from trio tasks, with no crossing per operation.

A call's stream (``TunnelClientStream`` on the calling side,
``TunnelServerStream`` in a handler) does its work with synchronous calls
into the protocol core and the driver; only its waits are asyncio's.  Here
those waits become trio's, so a trio task runs a whole call itself:

* it waits for the peer on a ``Signal`` the reader task sets;
* the call's deadline is a trio cancel scope around each wait (grpclib's own
  ``Wrapper`` needs an asyncio task, which a trio task is not), and it ends
  the wait with ``TimeoutError`` as grpclib does;
* a sender that has more than a window queued waits for the writer with one
  hop into asyncio.

The same stream may also be awaited from asyncio code (betterproto's bidi
stubs send from an asyncio task they start): each wait goes the way of the
flavour that awaits it.
"""

from __future__ import annotations

from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import trio
from grpclib.metadata import Deadline

from .._client_stream import TunnelClientStream
from .._driver import Driver
from .._server_stream import TunnelServerStream
from . import _layer
from ._bridge import Signal, hop, in_trio

if TYPE_CHECKING:
    from .._client_tunnel import ClientTunnel

__all__ = ["TrioClientStream", "prepare_server_stream"]

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")


async def wait_flushed(driver: Driver[Any, Any], stream_id: int) -> None:
    """``Driver.flushed`` for either flavour: trio crosses only when it must wait."""
    if not in_trio():
        await driver.flushed(stream_id)
    elif not _layer.queued_within_buffer(driver, stream_id):
        await hop(driver.flushed, stream_id)


class _CallDeadline:
    """grpclib's call ``Wrapper`` for a call that trio tasks drive.

    ``with wrapper:`` surrounds each wait of a call.  With a deadline, a trio
    wait runs in a cancel scope that ends at the deadline, and an expired
    deadline raises ``TimeoutError('Deadline exceeded')`` as grpclib's
    ``DeadlineWrapper`` does.  Waits in asyncio code (a bidi stub's sender)
    are bounded by the trio side's: when it times out it leaves the call,
    which ends the stream and wakes them.
    """

    cancelled: bool | None = None
    cancel_failed: bool | None = None

    def __init__(self, deadline: Deadline | None) -> None:
        self._deadline = deadline
        self._scopes: list[trio.CancelScope | None] = []
        self._expired = False

    def __enter__(self) -> None:
        if self._expired:
            raise TimeoutError("Deadline exceeded")
        scope = None
        if self._deadline is not None:
            remaining = self._deadline.time_remaining()
            if not remaining:
                self._expired = True
                raise TimeoutError("Deadline exceeded")
            if in_trio():
                scope = trio.CancelScope(deadline=trio.current_time() + remaining)
                scope.__enter__()
        self._scopes.append(scope)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> bool:
        scope = self._scopes.pop()
        if scope is None:
            return False
        swallowed = bool(scope.__exit__(exc_type, exc_val, exc_tb))
        if scope.cancelled_caught:
            self._expired = True
            self.cancelled = True
            raise TimeoutError("Deadline exceeded")
        return swallowed


class _ClientTunnelView:
    """A ``ClientTunnel`` as a trio-driven call sees it: its sends wait the trio way."""

    def __init__(self, tunnel: Any) -> None:
        self._tunnel = tunnel

    async def send_message(self, stream_id: int, data: bytes, *, end: bool = False) -> None:
        tunnel = self._tunnel
        if not in_trio():
            await tunnel.send_message(stream_id, data, end=end)
            return
        tunnel.queue_messages(stream_id, (data,), end=end)
        await wait_flushed(tunnel.driver, stream_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tunnel, name)


class TrioClientStream(TunnelClientStream[_SendType, _RecvType], Generic[_SendType, _RecvType]):
    """A tunneled call (grpclib's client ``Stream`` API) for trio tasks.

    ``tunnel`` is the call's ``ClientTunnel``, or a trio-flavoured async
    function that finds it when the request goes out (a channel that
    reopens its tunnels); ``pick_another`` (from a pool) gives it another
    tunnel if its first refuses it.
    """

    def __init__(self, tunnel: Any, *args: Any, **kwargs: Any) -> None:
        pick_another = kwargs.get("pick_another")
        if pick_another is not None:
            # A retry on another tunnel of the pool keeps trio-aware waits.
            def pick_view() -> ClientTunnel | None:
                picked = pick_another()
                return None if picked is None else cast("ClientTunnel", _ClientTunnelView(picked))

            kwargs["pick_another"] = pick_view
        source: Any
        if callable(tunnel):
            acquire = tunnel

            async def acquire_view() -> ClientTunnel:
                return cast("ClientTunnel", _ClientTunnelView(await acquire()))

            source = acquire_view
        else:
            # The view stands for the ClientTunnel: same attributes, trio-aware waits.
            source = cast("ClientTunnel", _ClientTunnelView(tunnel))
        super().__init__(source, *args, **kwargs)
        self._changed = Signal()  # type: ignore[assignment]

    async def __aenter__(self) -> TrioClientStream[_SendType, _RecvType]:
        self._wrapper = _CallDeadline(self._deadline)  # type: ignore[assignment]
        self._wrapper_ctx = None
        return self


class _ServerTunnelView:
    """A ``ServerTunnel`` as a trio handler's stream sees it."""

    def __init__(self, tunnel: Any) -> None:
        self._tunnel = tunnel

    async def send_message(self, stream_id: int, data: bytes) -> None:
        tunnel = self._tunnel
        if not in_trio():
            await tunnel.send_message(stream_id, data)
            return
        tunnel.core.send_message(stream_id, data)
        tunnel.driver.wake()
        await wait_flushed(tunnel.driver, stream_id)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._tunnel, name)


def prepare_server_stream(stream: TunnelServerStream[Any, Any]) -> None:
    """Let a trio handler wait on this tunneled stream without crossings.

    Called in the asyncio task that runs the handler, before the handler's
    trio task starts, so no change of the stream can be missed.
    """
    changed, tunnel = _layer.server_stream_parts(stream)
    _layer.set_server_stream_parts(
        stream, Signal(already_set=changed.is_set()), _ServerTunnelView(tunnel)
    )
