"""Stream states, and the one table that says what every input does in each.

Theory of operation
===================

Rule 1: every decision about whether an input is allowed on a stream, and
which state it leads to, is a row of ``TABLE``.  The code that handles an
input looks its row up first and does what the row says; it never tests a
state itself to decide legality.  What the table cannot know, because it
depends on bytes rather than states (a message larger than the limit, data
beyond the window, a half-close in the middle of a message), is checked by
``flow.InboundMessages`` after the row allowed the input.

Rule 2: the table does not know which end it runs on.  A stream is two
halves, as a gRPC call is: the *request half* carries the tunnel client's
messages and ends with its ``half_close``; the *response half* carries the
tunnel server's headers and messages and ends with ``close_stream``, which
ends the whole stream.  Both ends keep the state of both halves; the tunnel
client *sends* the request half and *receives* the response half, the tunnel
server the other way round.  So every input is an input of one half:

* the application's calls go to the half this end sends (the client's
  ``send_message``, ``half_close`` and ``cancel`` to the request half; the
  server's ``send_headers``, ``send_message`` and ``close_stream`` to the
  response half);
* frames from the peer go to the half the peer sends (a ``request_message``
  the server receives to the request half; a ``response_message`` the client
  receives to the response half; a ``window_update`` or a ``cancel`` too);
* one input comes from this end's writer: the client's ``new_stream`` frame
  leaving, after which the server may speak of the stream (``IDLE`` ->
  ``OPEN``).  Until then a frame for the stream is made up, and ends the
  tunnel.

What an input does is one of five outcomes (the cells of the table):

* ``Go(state)``: allowed; the half moves to ``state`` and the input has its
  effect (a note says when the effect depends on the state left);
* ``Reset(status, message)``: the peer broke a rule of this stream (or the
  client cancelled it): the stream ends with that status and the tunnel
  lives on (the server sends ``close_stream`` with it, the client sends
  ``cancel`` and reports it);
* ``Misuse(message)``: our application broke a rule: ``LocalProtocolError``,
  nothing changes;
* ``Fatal(message)``: the peer broke a rule of the tunnel:
  ``RemoteProtocolError``, and the protocol object is ``FAILED`` for good;
* ``Ignore(why)``: nothing happens (a late frame for a stream that is over,
  a cancel of a stream that is over).

Unary halves.  A half that carries exactly one message (the request half of
a unary-request method, the response half of a unary-response one) has the
same states; only a few rows differ, and each such row names its unary
outcome beside the streaming one.  Each stream is given the compiled rules
of its own cardinality when it is created (``compile_rules``;
``Stream.request_rules`` and ``response_rules``), so no input ever asks for
the cardinality again.

The end of a stream.  A stream is over when either half reaches ``OVER``
(``close_stream`` sent or received, a cancel, a reset); then both halves are
``OVER``, the stream no longer counts as active, and it leaves the stream
table as soon as its last queued frames have left.  Frames for ids that are
no longer (or never were) in the table are routed by id before any row is
looked up (``connection.Connection``): an id already used is late and
ignored, any other id ends the tunnel.

The tunnel as a whole has a state too (``TunnelState``): a tunnel client
that waits for the server's ``Settings`` is ``NEGOTIATING``; a tunnel server
after ``initiate_shutdown`` is ``SHUTTING_DOWN`` (new streams are refused);
and after a ``RemoteProtocolError`` the object is ``FAILED``, which sticks:
every later frame raises ``RemoteProtocolError`` again, and ``open_stream``
and every call that would send on a stream raise ``TunnelFailedError``.
Every stream ends with the failure (counted as failed) and nothing more is
sent.  Only the calls that let go of a stream (``cancel``, ``acknowledge``)
do nothing: there is nothing left to cancel or to open, and the driver,
which ends every call the moment the reader fails, must not trip on them.

docs/stream-states.md is this table rendered by ``render.py``; a test keeps
the two the same.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Generic, TypeVar

from grpclib.const import Status

from ..errors import LocalProtocolError, TunnelClosedError

__all__ = [
    "CLIENT_INPUTS",
    "FRAME_INPUTS",
    "MEANING",
    "REQUEST",
    "RESPONSE",
    "SERVER_INPUTS",
    "TABLE",
    "Fatal",
    "Go",
    "Ignore",
    "Input",
    "Misuse",
    "Outcome",
    "RequestState",
    "Reset",
    "ResponseState",
    "Row",
    "Rules",
    "TunnelFailedError",
    "TunnelState",
    "Unreachable",
    "compile_rules",
]


class RequestState(enum.IntEnum):
    """The request half: the tunnel client's messages (``MEANING`` says more).

    States (and inputs) are IntEnums so that the compiled rules are nested
    tuples indexed by them; states are compared by identity only.
    """

    OPEN = 0
    DONE = 1
    CLOSED = 2
    OVER = 3


class ResponseState(enum.IntEnum):
    """The response half: the tunnel server's headers and messages."""

    IDLE = 0
    OPEN = 1
    HEADERS = 2
    DONE = 3
    OVER = 4


#: What each state means (one mapping per half: the two enums are IntEnums,
#: so members of equal value compare equal and must never share a dict).
MEANING: Mapping[str, Mapping[RequestState, str] | Mapping[ResponseState, str]] = {
    "request": {
        RequestState.OPEN: "messages may follow (on a unary half: its one message is "
        "still to come)",
        RequestState.DONE: "a unary half's one message came; only the half-close may follow",
        RequestState.CLOSED: "half-closed: no more messages; responses may still flow",
        RequestState.OVER: "the stream is over",
    },
    "response": {
        ResponseState.IDLE: "tunnel client only: `new_stream` has not left yet, so the "
        "server cannot know the stream",
        ResponseState.OPEN: "no response headers yet",
        ResponseState.HEADERS: "headers sent (or arrived); messages may follow",
        ResponseState.DONE: "a unary half's one message went (or came); only "
        "`close_stream` may follow",
        ResponseState.OVER: "the stream is over: `close_stream` went (or came), or it was "
        "cancelled or reset",
    },
}


class Input(enum.IntEnum):
    """Everything that can happen to a stream."""

    # The application's calls.
    SEND_HEADERS = 0
    SEND_MESSAGE = 1
    HALF_CLOSE = 2
    CANCEL = 3
    CLOSE_STREAM = 4
    # This end's writer.
    NEW_STREAM_SENT = 5
    # Frames from the peer, by the frame's oneof member.
    RECV_REQUEST_MESSAGE = 6
    RECV_MORE_REQUEST_DATA = 7
    RECV_HALF_CLOSE = 8
    RECV_CANCEL = 9
    RECV_RESPONSE_HEADERS = 10
    RECV_RESPONSE_MESSAGE = 11
    RECV_MORE_RESPONSE_DATA = 12
    RECV_CLOSE_STREAM = 13
    RECV_WINDOW_UPDATE = 14
    RECV_SETTINGS = 15
    #: A frame with no member set.
    RECV_EMPTY = 16


class TunnelState(enum.Enum):
    """The protocol object as a whole (see the module docstring)."""

    NEGOTIATING = "negotiating"
    OPEN = "open"
    SHUTTING_DOWN = "shutting down"
    FAILED = "failed"


class TunnelFailedError(LocalProtocolError, TunnelClosedError):
    """A call that would start something on a protocol object that failed.

    A ``LocalProtocolError`` (the application used a dead object) and a
    ``TunnelClosedError`` (the tunnel cannot carry new streams), so a call
    that starts in the moment between the failure and the driver ending the
    tunnel fails like any call on a closed tunnel, with UNAVAILABLE.
    """


S = TypeVar("S", RequestState, ResponseState)


@dataclass(frozen=True, slots=True)
class Go(Generic[S]):
    """The input is allowed; the half moves to ``next``."""

    next: S
    #: What the input does beyond the usual, for the reader of the table.
    note: str = ""


@dataclass(frozen=True, slots=True)
class Reset:
    """The stream ends at once with this status; the tunnel lives on."""

    status: Status
    message: str


@dataclass(frozen=True, slots=True)
class Misuse:
    """``LocalProtocolError``; ``{stream_id}`` in the message is filled in."""

    message: str


@dataclass(frozen=True, slots=True)
class Fatal:
    """``RemoteProtocolError``: the tunnel ends.

    ``{kind}`` (the frame's member) and ``{stream_id}`` are filled in.
    """

    message: str


@dataclass(frozen=True, slots=True)
class Ignore:
    """Nothing happens."""

    why: str


@dataclass(frozen=True, slots=True)
class Unreachable:
    """A cell no end can reach (the server's response half is never IDLE)."""


Outcome = Go[S] | Reset | Misuse | Fatal | Ignore | Unreachable


@dataclass(frozen=True, slots=True)
class Row(Generic[S]):
    """A cell of the table: the outcome, and the one of a unary half if it differs."""

    outcome: Go[S] | Reset | Misuse | Fatal | Ignore
    unary: Go[S] | Reset | Misuse | Fatal | Ignore | None = None


# -- the table -------------------------------------------------------------------------

_NOT_ACTIVE = "stream {stream_id} is not active"
_LATE = "late: the stream is over"

_OPEN, _DONE, _CLOSED, _OVER = RequestState
_IDLE, _R_OPEN, _HEADERS, _R_DONE, _R_OVER = ResponseState
_I = Input

#: The request half (client -> server).
REQUEST: Mapping[tuple[RequestState, Input], Row[RequestState]] = {
    # -- the tunnel client's calls --
    (_OPEN, _I.SEND_MESSAGE): Row(Go(_OPEN), unary=Go(_DONE)),
    (_DONE, _I.SEND_MESSAGE): Row(Misuse("a unary request stream takes exactly one message")),
    (_CLOSED, _I.SEND_MESSAGE): Row(Misuse("the request stream was already half-closed")),
    (_OVER, _I.SEND_MESSAGE): Row(Misuse(_NOT_ACTIVE)),
    (_OPEN, _I.HALF_CLOSE): Row(Go(_CLOSED)),
    (_DONE, _I.HALF_CLOSE): Row(Go(_CLOSED)),
    (_CLOSED, _I.HALF_CLOSE): Row(Misuse("the request stream was already half-closed")),
    (_OVER, _I.HALF_CLOSE): Row(Misuse(_NOT_ACTIVE)),
    **{
        (state, _I.CANCEL): Row(
            Go(_OVER, "unsent requests are dropped; cancel goes out unless new_stream has not")
        )
        for state in (_OPEN, _DONE, _CLOSED)
    },
    (_OVER, _I.CANCEL): Row(Ignore("a no-op on a stream that is over")),
    # -- frames the tunnel server receives --
    (_OPEN, _I.RECV_REQUEST_MESSAGE): Row(Go(_OPEN), unary=Go(_DONE)),
    (_DONE, _I.RECV_REQUEST_MESSAGE): Row(
        Reset(Status.INVALID_ARGUMENT, "more than one request message for a unary-request method")
    ),
    (_OPEN, _I.RECV_MORE_REQUEST_DATA): Row(
        Go(_OPEN),
        unary=Reset(Status.INTERNAL, "message data arrived outside of a message"),
    ),
    (_DONE, _I.RECV_MORE_REQUEST_DATA): Row(Go(_DONE)),
    (_OPEN, _I.RECV_HALF_CLOSE): Row(
        Go(_CLOSED),
        unary=Reset(Status.INVALID_ARGUMENT, "no request message for a unary-request method"),
    ),
    (_DONE, _I.RECV_HALF_CLOSE): Row(Go(_CLOSED)),
    **{
        (_CLOSED, input_): Row(Reset(Status.INTERNAL, "tunnel client sent on a half-closed stream"))
        for input_ in (_I.RECV_REQUEST_MESSAGE, _I.RECV_MORE_REQUEST_DATA, _I.RECV_HALF_CLOSE)
    },
    **{
        (state, _I.RECV_CANCEL): Row(
            Reset(Status.CANCELLED, "stream cancelled by the tunnel client")
        )
        for state in (_OPEN, _DONE, _CLOSED)
    },
    (_OVER, _I.RECV_CANCEL): Row(
        Go(_OVER, "responses still queued are dropped; the queued close_stream still goes")
    ),
    **{(state, _I.RECV_WINDOW_UPDATE): Row(Go(state)) for state in (_OPEN, _DONE, _CLOSED)},
    (_OVER, _I.RECV_WINDOW_UPDATE): Row(Go(_OVER, "honoured while the last frames wait to leave")),
    **{
        (state, _I.RECV_EMPTY): Row(
            Reset(Status.INTERNAL, "tunnel client sent a frame with no content")
        )
        for state in (_OPEN, _DONE, _CLOSED)
    },
    **{
        (_OVER, input_): Row(Ignore(_LATE))
        for input_ in (
            _I.RECV_REQUEST_MESSAGE,
            _I.RECV_MORE_REQUEST_DATA,
            _I.RECV_HALF_CLOSE,
            _I.RECV_EMPTY,
        )
    },
}

_NEVER_SENT = Fatal(
    "tunnel server sent a {kind} frame for stream {stream_id}, whose new_stream was never sent"
)
_LIVE = (_R_OPEN, _HEADERS, _R_DONE)

#: The response half (server -> client).
RESPONSE: Mapping[tuple[ResponseState, Input], Row[ResponseState]] = {
    # -- the tunnel server's calls --
    (_R_OPEN, _I.SEND_HEADERS): Row(Go(_HEADERS)),
    (_HEADERS, _I.SEND_HEADERS): Row(Misuse("response headers were already sent")),
    (_R_DONE, _I.SEND_HEADERS): Row(Misuse("response headers were already sent")),
    (_R_OVER, _I.SEND_HEADERS): Row(Misuse(_NOT_ACTIVE)),
    (_R_OPEN, _I.SEND_MESSAGE): Row(
        Go(_HEADERS, "empty headers go first"), unary=Go(_R_DONE, "empty headers go first")
    ),
    (_HEADERS, _I.SEND_MESSAGE): Row(Go(_HEADERS), unary=Go(_R_DONE)),
    (_R_DONE, _I.SEND_MESSAGE): Row(Misuse("a unary response stream takes exactly one message")),
    (_R_OVER, _I.SEND_MESSAGE): Row(Misuse(_NOT_ACTIVE)),
    (_R_OPEN, _I.CLOSE_STREAM): Row(Go(_R_OVER, "empty headers go first")),
    (_HEADERS, _I.CLOSE_STREAM): Row(Go(_R_OVER)),
    (_R_DONE, _I.CLOSE_STREAM): Row(Go(_R_OVER)),
    (_R_OVER, _I.CLOSE_STREAM): Row(Misuse(_NOT_ACTIVE)),
    # -- the tunnel client's writer --
    (_IDLE, _I.NEW_STREAM_SENT): Row(Go(_R_OPEN)),
    # -- frames the tunnel client receives --
    (_R_OPEN, _I.RECV_RESPONSE_HEADERS): Row(Go(_HEADERS)),
    **{
        (state, _I.RECV_RESPONSE_HEADERS): Row(
            Reset(Status.INTERNAL, "tunnel server sent response headers twice")
        )
        for state in (_HEADERS, _R_DONE)
    },
    (_R_OPEN, _I.RECV_RESPONSE_MESSAGE): Row(
        Go(_HEADERS, "empty headers are implied"), unary=Go(_R_DONE, "empty headers are implied")
    ),
    (_HEADERS, _I.RECV_RESPONSE_MESSAGE): Row(Go(_HEADERS), unary=Go(_R_DONE)),
    (_R_DONE, _I.RECV_RESPONSE_MESSAGE): Row(
        Reset(Status.INTERNAL, "tunnel server sent more than one response for a unary method")
    ),
    (_R_OPEN, _I.RECV_MORE_RESPONSE_DATA): Row(
        Reset(Status.INTERNAL, "message data arrived outside of a message")
    ),
    (_HEADERS, _I.RECV_MORE_RESPONSE_DATA): Row(
        Go(_HEADERS), unary=Reset(Status.INTERNAL, "message data arrived outside of a message")
    ),
    (_R_DONE, _I.RECV_MORE_RESPONSE_DATA): Row(Go(_R_DONE)),
    **{(state, _I.RECV_CLOSE_STREAM): Row(Go(_R_OVER)) for state in _LIVE},
    **{(state, _I.RECV_WINDOW_UPDATE): Row(Go(state)) for state in _LIVE},
    (_R_OVER, _I.RECV_WINDOW_UPDATE): Row(
        Go(_R_OVER, "honoured while the last frames wait to leave")
    ),
    **{
        (state, _I.RECV_SETTINGS): Row(
            Reset(Status.INTERNAL, "tunnel server sent settings on a stream")
        )
        for state in _LIVE
    },
    **{
        (state, _I.RECV_EMPTY): Row(
            Reset(Status.INTERNAL, "tunnel server sent a frame with no content")
        )
        for state in _LIVE
    },
    **{
        (_IDLE, input_): Row(_NEVER_SENT)
        for input_ in (
            _I.RECV_RESPONSE_HEADERS,
            _I.RECV_RESPONSE_MESSAGE,
            _I.RECV_MORE_RESPONSE_DATA,
            _I.RECV_CLOSE_STREAM,
            _I.RECV_WINDOW_UPDATE,
            _I.RECV_SETTINGS,
            _I.RECV_EMPTY,
        )
    },
    **{
        (_R_OVER, input_): Row(Ignore(_LATE))
        for input_ in (
            _I.RECV_RESPONSE_HEADERS,
            _I.RECV_RESPONSE_MESSAGE,
            _I.RECV_MORE_RESPONSE_DATA,
            _I.RECV_CLOSE_STREAM,
            _I.RECV_SETTINGS,
            _I.RECV_EMPTY,
        )
    },
}

#: Both halves, by name.
TABLE = {"request": REQUEST, "response": RESPONSE}

#: The inputs each end feeds to each half, in the order the docs list them.
CLIENT_INPUTS: Mapping[str, tuple[Input, ...]] = {
    "request": (_I.SEND_MESSAGE, _I.HALF_CLOSE, _I.CANCEL),
    "response": (
        _I.NEW_STREAM_SENT,
        _I.RECV_RESPONSE_HEADERS,
        _I.RECV_RESPONSE_MESSAGE,
        _I.RECV_MORE_RESPONSE_DATA,
        _I.RECV_CLOSE_STREAM,
        _I.RECV_WINDOW_UPDATE,
        _I.RECV_SETTINGS,
        _I.RECV_EMPTY,
    ),
}
SERVER_INPUTS: Mapping[str, tuple[Input, ...]] = {
    "request": (
        _I.RECV_REQUEST_MESSAGE,
        _I.RECV_MORE_REQUEST_DATA,
        _I.RECV_HALF_CLOSE,
        _I.RECV_CANCEL,
        _I.RECV_WINDOW_UPDATE,
        _I.RECV_EMPTY,
    ),
    "response": (_I.SEND_HEADERS, _I.SEND_MESSAGE, _I.CLOSE_STREAM),
}

#: The input a frame from the peer is, by its oneof member (None: no member).
FRAME_INPUTS: Mapping[str | None, Input] = {
    "request_message": _I.RECV_REQUEST_MESSAGE,
    "more_request_data": _I.RECV_MORE_REQUEST_DATA,
    "half_close": _I.RECV_HALF_CLOSE,
    "cancel": _I.RECV_CANCEL,
    "response_headers": _I.RECV_RESPONSE_HEADERS,
    "response_message": _I.RECV_RESPONSE_MESSAGE,
    "more_response_data": _I.RECV_MORE_RESPONSE_DATA,
    "close_stream": _I.RECV_CLOSE_STREAM,
    "window_update": _I.RECV_WINDOW_UPDATE,
    "settings": _I.RECV_SETTINGS,
    None: _I.RECV_EMPTY,
}

# -- compiled for lookups -----------------------------------------------------------------

#: ``rules[state][input]``: one half's table for one cardinality, as nested
#: tuples indexed by the enums' values (a lookup is two C-level indexings).
Rules = tuple[tuple[Outcome[S], ...], ...]

_UNREACHABLE = Unreachable()


def compile_rules(
    table: Mapping[tuple[S, Input], Row[S]], states: type[S], *, unary: bool
) -> Rules[S]:
    """The rules of one half for a streaming or a unary half."""
    compiled: list[tuple[Outcome[S], ...]] = []
    for state in states:
        row: list[Outcome[S]] = []
        for input_ in Input:
            cell = table.get((state, input_))
            if cell is None:
                row.append(_UNREACHABLE)
            elif unary and cell.unary is not None:
                row.append(cell.unary)
            else:
                row.append(cell.outcome)
        compiled.append(tuple(row))
    return tuple(compiled)
