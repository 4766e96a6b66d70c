"""The hop between two routers: a call forwarded to the router that holds its key.

A router that gets a call for a key another router holds forwards it, as
it came, to that router's *peer listener* (``--peer-listen``), with a
``tunnel.Proxy`` whose target is a plain grpclib channel to the peer.  The
forwarded call carries two more request headers: ``grpctunnel-forwarded-by``
(the first router's id) and, with ``--peer-secret-file``,
``grpctunnel-peer-secret``; the peer listener refuses a call without the
right secret (UNAUTHENTICATED), and the peer TLS settings can require a
client certificate besides.

Rules that keep the hop safe:

* A forwarded call is never forwarded again.  A router serves it from its
  own tunnels or refuses it: no loop, whatever stale entries the registry
  holds.
* The refusal is explicit and immediate: a router that no longer holds the
  key (its agent went, it is draining) answers at once, trailers-only, with
  UNAVAILABLE and the trailer ``grpctunnel-peer-refused``, having given no
  message to anyone.  Only routers set it: every router drops it (and the
  other ``grpctunnel-`` peer headers) from what it forwards to and from
  agents, so a backend cannot forge it.
* The first router may then try the next candidate.  ``Replaying`` stands
  between the caller's stream and the proxy: it keeps the request messages
  read so far (up to ``REPLAY_LIMIT`` bytes) until the caller has been sent
  anything, and turns a refusal, or a peer that could not be reached at all
  (UNAVAILABLE before the proxy read a single request message), into
  ``PeerRefused`` instead of an answer.  The next attempt reads the same
  messages again.  Once anything went back to the caller, or the messages
  outgrew the limit, the call is committed and runs to its end where it is.
"""

from __future__ import annotations

import asyncio
import hmac
import ssl
from typing import Any, cast

import grpclib.client
import grpclib.server
from grpclib.const import Status
from grpclib.events import RecvRequest, listen
from grpclib.exceptions import GRPCError
from multidict import MultiDict, MultiMapping

from .. import _seam
from ..fallback import Fallback, install_fallback
from ..proxy import Proxy
from ..raw import RawMessage, RawStatusDetailsCodec
from ._config import Address, address

__all__ = [
    "FORWARDED_HEADER",
    "PEER_HEADERS",
    "PeerChannels",
    "PeerRefused",
    "Replaying",
    "is_forwarded",
    "peer_server",
    "refuse",
]

#: Request header of a forwarded call: the id of the router that forwarded it.
FORWARDED_HEADER = "grpctunnel-forwarded-by"
#: Request header of a forwarded call: the shared secret of the peers.
SECRET_HEADER = "grpctunnel-peer-secret"
#: Trailer of a refusal: why the peer did not take the call.
REFUSED_HEADER = "grpctunnel-peer-refused"
#: Headers only routers set; dropped from everything that comes from outside.
PEER_HEADERS = frozenset({FORWARDED_HEADER, SECRET_HEADER, REFUSED_HEADER})

#: Bytes of request messages kept for another attempt (as a tunnel's pool does).
REPLAY_LIMIT = 1 << 20


def is_forwarded(metadata: MultiMapping[Any]) -> bool:
    return FORWARDED_HEADER in metadata


async def refuse(
    stream: grpclib.server.Stream[RawMessage, RawMessage], router: str, key: str, why: str
) -> None:
    """Refuse a forwarded call at once, so that its router tries another."""
    await stream.send_trailing_metadata(
        status=Status.UNAVAILABLE,
        status_message=f"router {router} does not hold key {key!r} ({why})",
        metadata={REFUSED_HEADER: why},
    )


class PeerRefused(Exception):
    """A peer did not take the call, and nothing of it reached anyone: try another."""

    def __init__(self, result: str, why: str) -> None:
        super().__init__(why)
        #: ``refused`` (it answered so) or ``unreachable`` (it could not be reached).
        self.result = result


class Replaying:
    """The caller's stream as the proxy sees it, for one attempt after another.

    It has the server ``Stream`` methods the proxy uses.  ``metadata`` is
    what the next attempt forwards (set per attempt).  Reads from the
    caller go through one task of its own, so that an attempt cancelled in
    the middle of a read loses nothing: the next read gets that message.
    """

    # Set by the proxy through _seam.use_status_details_codec; the caller's
    # own stream gets the raw codec in __init__, and is the one that sends.
    _status_details_codec: Any = None

    def __init__(self, stream: grpclib.server.Stream[RawMessage, RawMessage]) -> None:
        self._stream = stream
        self.metadata: MultiDict[Any] = MultiDict(stream.metadata or ())
        self.deadline = stream.deadline
        _seam.use_status_details_codec(stream, RawStatusDetailsCodec())
        self._log: list[RawMessage] = []
        self._logged = 0
        self._position = 0
        self._ended = False
        self._pending: asyncio.Future[RawMessage | None] | None = None
        #: Something went back to the caller (or the log overflowed): no more attempts.
        self.committed = False
        self._detect = False
        self._reads = 0

    def rewind(self, metadata: MultiDict[Any], *, peer: bool) -> None:
        """Start an attempt: the messages read so far come again; ``peer`` refusals count."""
        if self.committed:
            raise RuntimeError("a committed call cannot be tried again")
        self.metadata = metadata
        self._position = 0
        self._reads = 0
        self._detect = peer

    @property
    def stream(self) -> grpclib.server.Stream[RawMessage, RawMessage]:
        """This, typed as what the proxy takes (it uses only what is defined here)."""
        return cast("grpclib.server.Stream[RawMessage, RawMessage]", self)

    async def recv_message(self) -> RawMessage | None:
        self._reads += 1
        if self._position < len(self._log):
            self._position += 1
            return self._log[self._position - 1]
        if self.committed and self._log:
            self._log.clear()  # replayed for the last time: let it go
            self._position = 0
        if self._ended:
            return None
        if self._pending is None:
            self._pending = asyncio.ensure_future(self._read())
        message = await asyncio.shield(self._pending)
        self._pending = None
        if message is None:
            self._ended = True
            return None
        if not self.committed:
            self._logged += len(message.data)
            if self._logged > REPLAY_LIMIT:
                self._commit()
            else:
                self._log.append(message)
                self._position += 1
        return message

    async def _read(self) -> RawMessage | None:
        return await self._stream.recv_message()

    def _commit(self) -> None:
        self.committed = True
        if self._position >= len(self._log):
            self._log.clear()
            self._position = 0

    async def send_initial_metadata(self, *, metadata: Any = None) -> None:
        self._commit()
        await self._stream.send_initial_metadata(metadata=metadata)

    async def send_message(self, message: RawMessage) -> None:
        self._commit()
        await self._stream.send_message(message)

    async def send_trailing_metadata(
        self,
        *,
        status: Status = Status.OK,
        status_message: str | None = None,
        status_details: Any = None,
        metadata: Any = None,
    ) -> None:
        trailers: MultiDict[Any] = MultiDict(metadata or ())
        refusal = trailers.get(REFUSED_HEADER)
        if self._detect and not self.committed and status is Status.UNAVAILABLE:
            if refusal is not None:
                raise PeerRefused("refused", status_message or str(refusal))
            if self._reads == 0:  # the proxy never got as far as reading: not reached
                raise PeerRefused("unreachable", status_message or "unreachable")
        self._commit()
        trailers.popall(REFUSED_HEADER, None)
        await self._stream.send_trailing_metadata(
            status=status,
            status_message=status_message,
            status_details=status_details,
            metadata=trailers,
        )

    async def aclose(self) -> None:
        """Stop the read in progress, if any (the call is over)."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.cancel()
            await asyncio.gather(pending, return_exceptions=True)


class PeerChannels:
    """One grpclib channel, and one proxy over it, per peer address."""

    def __init__(self, ssl_context: ssl.SSLContext | None, drop: frozenset[str]) -> None:
        self._ssl = ssl_context
        self._drop = drop
        self._proxies: dict[str, Proxy] = {}
        self._channels: list[grpclib.client.Channel] = []

    def proxy(self, peer: str) -> Proxy:
        proxy = self._proxies.get(peer)
        if proxy is None:
            target: Address = address(peer)
            channel = grpclib.client.Channel(target.host, target.port, ssl=self._ssl)
            _seam.coalesce_writes(channel)  # a call's frames in one write (tunnel._coalesce)
            self._channels.append(channel)
            proxy = self._proxies[peer] = Proxy(channel, drop_metadata=self._drop)
        return proxy

    def close(self) -> None:
        for channel in self._channels:
            channel.close()
        self._channels.clear()
        self._proxies.clear()


def peer_server(fallback: Fallback, secret: str | None) -> grpclib.server.Server:
    """The peer listener: forwarded calls only, from routers that know ``secret``."""
    server = grpclib.server.Server([])
    _seam.coalesce_writes(server)  # a call's frames in one write (tunnel._coalesce)
    install_fallback(server, fallback)
    if secret is not None:
        expected = secret.encode()

        async def check(request: RecvRequest) -> None:
            given = request.metadata.get(SECRET_HEADER)
            if not isinstance(given, str) or not hmac.compare_digest(given.encode(), expected):
                raise GRPCError(Status.UNAUTHENTICATED, "not a peer router: wrong peer secret")

        listen(server, RecvRequest, check)
    return server


def peer_metadata(metadata: MultiMapping[Any], router: str, secret: str | None) -> MultiDict[Any]:
    """What a forwarded call carries: the caller's headers, and who forwards it."""
    forwarded: MultiDict[Any] = MultiDict(
        (k, v) for k, v in metadata.items() if k not in PEER_HEADERS
    )
    forwarded[FORWARDED_HEADER] = router
    if secret is not None:
        forwarded[SECRET_HEADER] = secret
    return forwarded
