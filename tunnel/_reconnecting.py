"""``ReconnectingTunnelChannel``: a forward tunnel channel that heals.

A plain grpclib ``Channel`` dials again on the next call after its server
restarts; a ``TunnelChannel`` is one tunnel, and once that tunnel is gone
every call on it fails.  This channel keeps a tunnel open for as long as it
is used: when the tunnel drops it opens a new one, with the backoff and
permanent-refusal policy of ``_retry.Retry``, logging each drop and each
reopening with its reason.

Calls while there is no tunnel follow gRPC's ``wait_for_ready`` rule:

* by default a call fails fast with UNAVAILABLE when the last attempt to
  open a tunnel failed and the next is not due yet; while an attempt is
  under way, the call waits for it;
* with ``wait_for_ready=True`` a call waits for a tunnel until its own
  deadline.

Each new tunnel may reach a different backend (that is what a tunnel pins),
so the application is told: ``tunnels_opened`` counts them and
``on_tunnel_open(tunnel_channel)`` (plain or async) is called for each.
"""

from __future__ import annotations

import asyncio
import enum
import logging
from collections.abc import Callable, Collection
from types import TracebackType
from typing import Any, TypeVar

import grpclib.client
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from ._client_tunnel import ClientTunnel
from ._retry import PERMANENT_STATUSES, MetadataSource, Retry, check_callback, resolve_metadata
from ._seam import become_channel, channel_codecs
from ._tasks import call_back, cancel_and_wait
from ._tunnel import describe
from ._wire import PROTO_CODEC, PROTO_STATUS_DETAILS_CODEC
from .channel import CallingChannel, CallTarget, TunnelChannel, open_tunnel
from .options import TunnelOptions

__all__ = ["ReconnectingTunnelChannel"]

log = logging.getLogger("tunnel")

_SendType = TypeVar("_SendType")
_RecvType = TypeVar("_RecvType")


class _State(enum.Enum):
    IDLE = "idle"  # nothing tried yet
    CONNECTING = "connecting"  # an attempt is under way
    READY = "ready"  # a tunnel is open
    TRANSIENT_FAILURE = "transient failure"  # waiting before the next attempt
    FAILED = "failed"  # a permanent refusal: no more attempts
    CLOSED = "closed"


class ReconnectingTunnelChannel(CallingChannel):
    """A forward tunnel channel that reopens its tunnel when it drops.

    It opens its first tunnel on first use (a call, ``wait_ready()`` or
    ``async with``) and keeps one open until ``close()``.  See the module
    docstring for how calls behave while there is no tunnel.
    """

    # grpclib's Channel.__init__ is deliberately not called (no connection).
    def __init__(
        self,
        channel: grpclib.client.Channel,
        *,
        metadata: MetadataSource = None,
        options: TunnelOptions | None = None,
        wait_for_ready: bool = False,
        min_backoff: float = 0.1,
        max_backoff: float = 30.0,
        jitter: float = 0.2,
        stable_after: float = 5.0,
        permanent_statuses: Collection[Status] = PERMANENT_STATUSES,
        permanent_attempts: int = 3,
        on_tunnel_open: Callable[[TunnelChannel], object] | None = None,
    ) -> None:
        check_callback(on_tunnel_open, "on_tunnel_open")
        self._channel = channel
        self._metadata = metadata
        self._options = options or TunnelOptions()
        self._wait_for_ready = wait_for_ready
        self._retry = Retry(
            min_backoff=min_backoff,
            max_backoff=max_backoff,
            jitter=jitter,
            stable_after=stable_after,
            permanent_statuses=permanent_statuses,
            permanent_attempts=permanent_attempts,
        )
        self._on_tunnel_open = on_tunnel_open
        codec, status_details_codec = channel_codecs(channel)
        self.__dispatch__ = become_channel(
            self,
            codec=codec or PROTO_CODEC,
            status_details_codec=status_details_codec or PROTO_STATUS_DETAILS_CODEC,
        )
        self._phase = _State.IDLE
        self._current: TunnelChannel | None = None
        self._changed = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        #: How many tunnels this channel has opened so far.
        self.tunnels_opened = 0
        #: Why the last attempt failed, or why the last tunnel ended; after a
        #: permanent refusal, that refusal.  None while the first tunnel is
        #: being opened and after ``close()``.
        self.error: BaseException | None = None

    # -- state ---------------------------------------------------------------

    @property
    def tunnel(self) -> TunnelChannel | None:
        """The tunnel calls go to now, if one is open."""
        current = self._current
        return current if current is not None and current._tunnel.usable else None

    @property
    def closed(self) -> bool:
        return self._phase is _State.CLOSED

    def _set_state(self, state: _State) -> None:
        if self._phase is _State.CLOSED:
            return
        self._phase = state
        self._changed.set()
        self._changed = asyncio.Event()

    def _start(self) -> None:
        if self._keeper is None and self._phase is _State.IDLE:
            self._set_state(_State.CONNECTING)
            self._keeper = asyncio.create_task(self._keep_open(), name="reconnecting-tunnel")

    async def wait_ready(self) -> TunnelChannel:
        """Wait for an open tunnel (bound it yourself); raise if there will be none."""
        self._start()
        while True:
            tunnel = self.tunnel
            if tunnel is not None:
                return tunnel
            self._raise_if_over()
            await self._changed.wait()

    def _raise_if_over(self) -> None:
        if self._phase is _State.CLOSED:
            raise GRPCError(Status.UNAVAILABLE, "channel closed")
        if self._phase is _State.FAILED:
            assert isinstance(self.error, GRPCError)
            raise self.error

    # -- calls -----------------------------------------------------------------

    async def _acquire(self) -> ClientTunnel:
        """The tunnel for a call that is about to start (see the module docstring)."""
        self._start()
        while True:
            tunnel = self.tunnel
            if tunnel is not None:
                return tunnel._tunnel
            self._raise_if_over()
            if self._phase is _State.TRANSIENT_FAILURE and not self._wait_for_ready:
                cause = describe(self.error) if self.error is not None else "no tunnel"
                raise GRPCError(Status.UNAVAILABLE, f"no tunnel open: {cause}")
            await self._changed.wait()

    def _call_target(self) -> CallTarget:
        return self._acquire, {}

    # -- keeping a tunnel open ---------------------------------------------------

    async def _keep_open(self) -> None:
        try:
            await self._reopen_forever()
        except Exception as exc:  # a bug: say so, and release every waiting call
            log.exception("forward tunnel keeper failed")
            self.error = GRPCError(Status.INTERNAL, f"tunnel keeper failed: {describe(exc)}")
            self._set_state(_State.FAILED)

    async def _reopen_forever(self) -> None:
        loop = asyncio.get_running_loop()
        retry = self._retry
        down_since = loop.time()
        attempts = 0
        while True:
            attempts += 1
            self._set_state(_State.CONNECTING)
            try:
                metadata = await resolve_metadata(self._metadata)
                current = await open_tunnel(self._channel, metadata=metadata, options=self._options)
            except Exception as exc:
                self.error = exc
                try:
                    retry.failed(exc)
                except GRPCError:
                    log.error("forward tunnel refused (%s); giving up", describe(exc))
                    self._set_state(_State.FAILED)
                    return
                delay = retry.next_delay()
                log.warning(
                    "forward tunnel attempt %d failed (%s); retrying in %.2f s",
                    attempts,
                    describe(exc),
                    delay,
                )
                self._set_state(_State.TRANSIENT_FAILURE)
                await asyncio.sleep(delay)
                continue
            opened_at = loop.time()
            retry.opened()
            self.tunnels_opened += 1
            self._current = current
            self.error = None
            log.info(
                "forward tunnel %d open after %d attempt(s), %.2f s without a tunnel",
                self.tunnels_opened,
                attempts,
                opened_at - down_since,
            )
            self._set_state(_State.READY)
            if self._on_tunnel_open is not None:
                await call_back(self._on_tunnel_open, current, what="on_tunnel_open")
            try:
                await current.wait_closed()
            finally:
                self._current = None
            down_since = loop.time()
            attempts = 0
            self.error = current.error
            retry.closed_after(down_since - opened_at)
            reason = describe(current.error) if current.error is not None else "closed"
            if retry.stable_after <= down_since - opened_at:
                log.warning("forward tunnel lost (%s); reopening now", reason)
                continue
            delay = retry.next_delay()
            log.warning("forward tunnel lost (%s); reopening in %.2f s", reason, delay)
            self._set_state(_State.TRANSIENT_FAILURE)
            await asyncio.sleep(delay)

    # -- closing -------------------------------------------------------------------

    def close(self) -> None:
        """Stop reopening, end the current tunnel (its calls are cancelled)."""
        if self._phase is _State.CLOSED:
            return
        self._set_state(_State.CLOSED)
        if self._current is not None:
            self._current.close()
        if self._keeper is not None:
            self._keeper.cancel()

    async def wait_closed(self) -> None:
        """Wait until the tunnel and every task of this channel are over."""
        if self._keeper is not None:
            await cancel_and_wait([self._keeper])
        if self._current is not None:
            await self._current.wait_closed()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> ReconnectingTunnelChannel:
        self._start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc_val: BaseException | None,
        exc_tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    async def __connect__(self) -> Any:
        raise RuntimeError("a ReconnectingTunnelChannel has no connection of its own")

    def __del__(self) -> None:
        pass

    def __repr__(self) -> str:
        return f"<ReconnectingTunnelChannel {self._phase.value}, {self.tunnels_opened} opened>"
