"""The state table (``tunnel/_core/states.py``), checked against the protocol objects.

In the style of h2's ``test_state_machines``: Hypothesis draws a half, a
state of it and an input, on a stream of a drawn cardinality (with flow
control on or off).  The stream is driven into that state through the
public API only (by one of several routes, also drawn), the input is applied
through the public API, and the outcome must be exactly the table's: the
transition it names (and the input's effect: events, queued frames), or the
reset it names (with its status, as an event and on the wire), or the
``LocalProtocolError`` it names with nothing changed, or the
``RemoteProtocolError`` that leaves the object failed for good, or nothing
at all.  A few more random inputs follow, each checked the same way from
whatever state the stream is in then, and after every step the object's
invariants hold (``invariants.check``).

What the table cannot know (the bytes of messages) is checked by
``flow.InboundMessages`` after a row allowed the input; the random walk
models the three rules of that kind it can meet, so the table and those
checks are tested together.

Beside it: the table is complete (every input an end feeds to a half has a
row in every state that end reaches), its outcomes suit their inputs (calls
are never reset, frames never misuse), and docs/stream-states.md is its
rendering.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.rpc.status_pb2 import Status as StatusProto
from grpclib.const import Cardinality, Status
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from tunnel._core import TunnelClientProtocol, TunnelServerProtocol
from tunnel._core.connection import RULES
from tunnel._core.events import (
    DataReceived,
    HalfClosed,
    HeadersReceived,
    StreamEnded,
    StreamReset,
)
from tunnel._core.flow import MAX_WINDOW, OutboundMessage
from tunnel._core.render import markdown
from tunnel._core.states import (
    CLIENT_INPUTS,
    REQUEST,
    RESPONSE,
    SERVER_INPUTS,
    Fatal,
    Go,
    Ignore,
    Input,
    Misuse,
    RequestState,
    Reset,
    ResponseState,
    Unreachable,
)
from tunnel._pb.tunnel_pb2 import ClientToServer, ServerToClient
from tunnel.errors import LocalProtocolError, RemoteProtocolError

from . import invariants
from .helpers import (
    BIDI,
    CLIENT_STREAM,
    SERVER_STREAM,
    UNARY,
    cancel,
    client_window_update,
    close,
    half_close,
    more_request,
    more_response,
    negotiated_client,
    negotiated_server,
    new_stream,
    request,
    response,
    response_headers,
    server_window_update,
)
from .helpers import settings as settings_frame

DOCS = Path(__file__).resolve().parents[2] / "docs" / "stream-states.md"

SETTINGS = settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])

METHOD_OF = {
    Cardinality.UNARY_UNARY: UNARY,
    Cardinality.STREAM_UNARY: CLIENT_STREAM,
    Cardinality.UNARY_STREAM: SERVER_STREAM,
    Cardinality.STREAM_STREAM: BIDI,
}
SID = 1
R, P = RequestState, ResponseState  # the request and the response half
CALLS = {Input.SEND_HEADERS, Input.SEND_MESSAGE, Input.HALF_CLOSE, Input.CANCEL, Input.CLOSE_STREAM}
#: The inputs that start a message, and those that continue one.
ENVELOPES = {Input.RECV_REQUEST_MESSAGE, Input.RECV_RESPONSE_MESSAGE}
MORE_DATA = {Input.RECV_MORE_REQUEST_DATA, Input.RECV_MORE_RESPONSE_DATA}


# -- the table itself ----------------------------------------------------------------


def test_the_docs_are_the_rendered_table() -> None:
    assert DOCS.read_text() == markdown(), (
        "docs/stream-states.md is stale: run "
        "`.venv/bin/python -m tunnel._core.render > docs/stream-states.md`"
    )


@pytest.mark.parametrize("half", ["request", "response"])
@pytest.mark.parametrize("end", ["client", "server"])
def test_every_input_has_a_row_in_every_state_its_end_reaches(half: str, end: str) -> None:
    table: Any = REQUEST if half == "request" else RESPONSE
    inputs = (CLIENT_INPUTS if end == "client" else SERVER_INPUTS)[half]
    states = list(R if half == "request" else P)
    for state in states:
        for input_ in inputs:
            row = table.get((state, input_))
            idle_only = input_ is Input.NEW_STREAM_SENT and state is not P.IDLE
            never_idle = end == "server" and half == "response" and state is P.IDLE
            if idle_only or never_idle:
                assert row is None, f"{state.name} x {input_.name} cannot happen"
                continue
            assert row is not None, f"no row for {state.name} x {input_.name}"
            for outcome in (row.outcome, row.unary):
                if input_ in CALLS:
                    assert not isinstance(outcome, Reset | Fatal)
                else:
                    assert not isinstance(outcome, Misuse)
    # Nothing in the table that no end feeds.
    fed = set(CLIENT_INPUTS[half]) | set(SERVER_INPUTS[half])
    assert {input_ for _, input_ in table} <= fed


def test_the_compiled_rules_follow_the_table() -> None:
    for cardinality, (request_rules, response_rules) in RULES.items():
        for table, rules, unary in (
            (REQUEST, request_rules, not cardinality.value.client_streaming),
            (RESPONSE, response_rules, not cardinality.value.server_streaming),
        ):
            for (state, input_), row in table.items():
                want = row.unary if unary and row.unary is not None else row.outcome
                assert rules[state][input_] is want
            unreachable = sum(isinstance(cell, Unreachable) for line in rules for cell in line)
            assert unreachable == len(rules) * len(Input) - len(table)


# -- driving one stream --------------------------------------------------------------


@dataclass
class Side:
    """One end with one stream (id 1), and what the test knows about it."""

    proto: Any
    client: bool
    cardinality: Cardinality
    flow_control: bool
    #: A message of the peer's is half received (its envelope said 2 bytes, 1 came).
    in_message: bool = False
    #: Frames pulled from the end so far, for this stream.
    sent: list[Any] = field(default_factory=list)

    @property
    def unary_request(self) -> bool:
        return not self.cardinality.value.client_streaming

    @property
    def unary_response(self) -> bool:
        return not self.cardinality.value.server_streaming

    def states(self) -> tuple[RequestState, ResponseState]:
        stream = self.proto._streams.get(SID)
        if stream is None:
            return R.OVER, P.OVER
        return stream.request, stream.response

    def state(self, half: str) -> Any:
        return self.states()[0 if half == "request" else 1]

    def pull(self) -> list[Any]:
        frames = []
        while (frame := self.proto.next_frame()) is not None:
            frames.append(frame)
        mine = [f for f in frames if f.stream_id == SID]
        self.sent += mine
        return mine

    def snapshot(self) -> tuple[object, ...]:
        stream = self.proto._streams.get(SID)
        queue = None if stream is None else (len(stream.queue), stream.queue.buffered)
        counters = self.proto.counters
        return (
            self.states(),
            queue,
            len(self.proto._control),
            self.proto.state,
            counters.messages_sent,
            counters.messages_received,
            counters.streams_failed,
        )


def new_side(cardinality: Cardinality, *, client: bool, flow_control: bool) -> Side:
    proto: TunnelClientProtocol | TunnelServerProtocol
    if client:
        proto = negotiated_client(disable_flow_control=not flow_control)
        assert proto.open_stream(METHOD_OF[cardinality], (), cardinality) == SID
    else:
        proto = negotiated_server(disable_flow_control=not flow_control)
        proto.receive_frame(new_stream(SID, METHOD_OF[cardinality], revision=int(flow_control)))
    return Side(proto, client, cardinality, flow_control)


def reachable(side: Side, half: str) -> list[Any]:
    """The states of a half this stream can reach."""
    if half == "request":
        return [R.OPEN, R.CLOSED, R.OVER] + ([R.DONE] if side.unary_request else [])
    states = [P.OPEN, P.HEADERS, P.OVER] + ([P.DONE] if side.unary_response else [])
    return ([P.IDLE] if side.client else []) + states


def reach(data: st.DataObject, side: Side, request: RequestState, resp: ResponseState) -> None:
    """Drive the stream into (request, resp) through the public API only."""
    proto = side.proto
    if resp is P.OVER:
        routes = ["cancel", "close", "reset"]
        route = data.draw(st.sampled_from(routes), label="route to OVER")
        if side.client:
            if route != "cancel" or data.draw(st.booleans(), label="announce first"):
                side.pull()
            if route == "cancel":
                proto.cancel(SID)
            else:
                proto.receive_frame(
                    close(SID) if route == "close" else ServerToClient(stream_id=SID)
                )
        elif route == "close":
            if data.draw(st.booleans(), label="queue a response first"):
                proto.send_message(SID, b"r" * data.draw(st.integers(0, 70_000)))
            proto.close_stream(SID, None)
        else:
            proto.receive_frame(cancel(SID) if route == "cancel" else ClientToServer(stream_id=SID))
        if data.draw(st.booleans(), label="pull what is queued"):
            side.pull()
        assert side.states() == (R.OVER, P.OVER)
        return
    if side.client:
        if request is R.DONE:
            proto.send_message(SID, b"q")
        elif request is R.CLOSED:
            if side.unary_request or data.draw(st.booleans(), label="a request first"):
                proto.send_message(SID, b"q")
            proto.half_close(SID)
        if resp is not P.IDLE:
            side.pull()
        if resp is P.HEADERS:
            if not side.unary_response and data.draw(st.booleans(), label="implied headers"):
                receive_message(side, partial=side.in_message)
            else:
                proto.receive_frame(response_headers(SID))
                if side.in_message:
                    receive_message(side, partial=True)
        elif resp is P.DONE:
            if data.draw(st.booleans(), label="headers first"):
                proto.receive_frame(response_headers(SID))
            receive_message(side, partial=side.in_message)
    else:
        if request is R.DONE:
            receive_message(side, partial=side.in_message)
        elif request is R.CLOSED:
            if side.unary_request or data.draw(st.booleans(), label="a request first"):
                receive_message(side, partial=False)
            proto.receive_frame(half_close(SID))
        elif side.in_message:
            receive_message(side, partial=True)
        if resp is P.HEADERS:
            if not side.unary_response and data.draw(st.booleans(), label="implied headers"):
                proto.send_message(SID, b"r")
            else:
                proto.send_headers(SID, [("x-h", "v")])
        elif resp is P.DONE:
            if data.draw(st.booleans(), label="headers first"):
                proto.send_headers(SID, ())
            proto.send_message(SID, b"r")
        if data.draw(st.booleans(), label="pull what is queued"):
            side.pull()
    assert side.states() == (request, resp)


def receive_message(side: Side, *, partial: bool) -> None:
    """A whole message of the peer's, or the first byte of a two-byte one."""
    kwargs = {"size": 2} if partial else {}
    frame = (response if side.client else request)(SID, b"x", **kwargs)
    events = side.proto.receive_frame(frame)
    assert events[-1] == DataReceived(stream_id=SID, data=b"x", end_of_message=not partial)
    side.in_message = partial


FRAMES: dict[Input, Callable[[], ClientToServer | ServerToClient]] = {
    Input.RECV_REQUEST_MESSAGE: lambda: request(SID, b"q"),
    Input.RECV_MORE_REQUEST_DATA: lambda: more_request(SID, b"y"),
    Input.RECV_HALF_CLOSE: lambda: half_close(SID),
    Input.RECV_CANCEL: lambda: cancel(SID),
    Input.RECV_RESPONSE_HEADERS: lambda: response_headers(SID),
    Input.RECV_RESPONSE_MESSAGE: lambda: response(SID, b"r"),
    Input.RECV_MORE_RESPONSE_DATA: lambda: more_response(SID, b"y"),
    Input.RECV_CLOSE_STREAM: lambda: close(SID),
    Input.RECV_SETTINGS: lambda: settings_frame(0, 1, stream_id=SID),
}


def apply(side: Side, input_: Input) -> Any:
    """Feed one input through the public API; returns what it returned."""
    proto = side.proto
    if input_ is Input.SEND_HEADERS:
        return proto.send_headers(SID, [("x-h", "v")])
    if input_ is Input.SEND_MESSAGE:
        return proto.send_message(SID, b"m")
    if input_ is Input.HALF_CLOSE:
        return proto.half_close(SID)
    if input_ is Input.CANCEL:
        return proto.cancel(SID)
    if input_ is Input.CLOSE_STREAM:
        return proto.close_stream(SID, None)
    if input_ is Input.NEW_STREAM_SENT:
        return side.pull()
    if input_ is Input.RECV_WINDOW_UPDATE:
        frame: Any = (server_window_update if side.client else client_window_update)(SID, 10)
    elif input_ is Input.RECV_EMPTY:
        frame = (ServerToClient if side.client else ClientToServer)(stream_id=SID)
    else:
        frame = FRAMES[input_]()
    return proto.receive_frame(frame)


# -- what the table says must happen ---------------------------------------------------


def expected(side: Side, half: str, input_: Input) -> Any:
    """The table's outcome for this input now, and what the bytes add to it."""
    request_rules, response_rules = RULES[side.cardinality]
    rules = request_rules if half == "request" else response_rules
    outcome = rules[side.state(half)][input_]
    if isinstance(outcome, Go):
        # Checks on bytes, made once the row allowed the input (flow.py).
        if input_ in ENVELOPES and side.in_message:
            return Reset(
                Status.INTERNAL, "a new message began before the previous one was complete"
            )
        if input_ in MORE_DATA and not side.in_message:
            return Reset(Status.INTERNAL, "message data arrived outside of a message")
        if input_ is Input.RECV_HALF_CLOSE and side.in_message:
            return Reset(Status.INTERNAL, "half-close in the middle of a message")
    return outcome


def check_step(side: Side, half: str, input_: Input) -> None:
    """Apply one input and hold the object to the table's outcome."""
    outcome = expected(side, half, input_)
    event(f"{'client' if side.client else 'server'} {half}: {type(outcome).__name__}")
    before = side.snapshot()
    states_before = side.states()
    stream = side.proto._streams.get(SID)
    window_before = None if stream is None else stream.queue.window
    try:
        result = apply(side, input_)
    except LocalProtocolError as exc:
        assert isinstance(outcome, Misuse), f"{input_.name}: table says {outcome}, got {exc!r}"
        assert str(exc) == outcome.message.format(stream_id=SID)
        assert side.snapshot() == before, "a refused call changed something"
        return
    except RemoteProtocolError as exc:
        assert isinstance(outcome, Fatal), f"{input_.name}: table says {outcome}, got {exc!r}"
        kind = apply_kind(side, input_)
        assert str(exc) == outcome.message.format(kind=kind, stream_id=SID)
        invariants.failed_for_good(side.proto, [SID])
        return
    assert not isinstance(outcome, Misuse | Fatal), f"{input_.name}: table says {outcome}"
    if isinstance(outcome, Ignore):
        assert result in ([], None)
        assert side.snapshot() == before, "an ignored input changed something"
    elif isinstance(outcome, Reset):
        check_reset(side, outcome, result)
    else:
        assert isinstance(outcome, Go)
        assert side.state(half) is outcome.next
        check_effect(side, input_, states_before, result, window_before)
    invariants.check(side.proto)


def apply_kind(side: Side, input_: Input) -> str:
    if input_ is Input.RECV_EMPTY:
        return "empty"
    if input_ is Input.RECV_WINDOW_UPDATE:
        return "window_update"
    kind: str | None = FRAMES[input_]().WhichOneof("frame")
    assert kind is not None
    return kind


def check_reset(side: Side, reset: Reset, result: Any) -> None:
    """The stream ended with the row's status: as an event and on the wire."""
    status = StatusProto(code=reset.status.value, message=reset.message)
    if side.client:
        assert result == [StreamEnded(stream_id=SID, status=status, trailers=(), reset=True)]
    else:
        assert result == [
            StreamReset(stream_id=SID, code=reset.status.value, message=reset.message)
        ]
    side.in_message = False
    assert side.states() == (R.OVER, P.OVER)
    assert not side.proto.is_open(SID)
    frames = side.pull()
    if side.client:
        assert [f.WhichOneof("frame") for f in frames] == ["cancel"]
    else:
        final = frames[-1].close_stream
        assert (final.status.code, final.status.message) == (status.code, status.message)
        kinds = [f.WhichOneof("frame") for f in side.sent]
        assert kinds.count("response_headers") == 1, "headers, exactly once, before the status"


def check_effect(
    side: Side, input_: Input, before: tuple[Any, Any], result: Any, window: int | None
) -> None:
    """What an input the table allowed does, beside moving the state."""
    proto = side.proto
    _, response_before = before
    stream = proto._streams.get(SID)
    queued = [] if stream is None else list(stream.queue._items)
    if input_ is Input.SEND_MESSAGE:
        assert isinstance(queued[-1], OutboundMessage) and queued[-1].size == 1
        if not side.client and response_before is P.OPEN:
            assert queued[-2].HasField("response_headers"), "empty headers go first"
    elif input_ is Input.SEND_HEADERS:
        assert queued[-1].HasField("response_headers")
    elif input_ is Input.HALF_CLOSE:
        assert queued[-1].HasField("half_close")
    elif input_ is Input.CANCEL:
        frames = side.pull()
        if response_before is P.IDLE:
            assert frames == [], "a cancel before new_stream left sends nothing"
            assert not side.sent
        else:
            assert [f.WhichOneof("frame") for f in frames] == ["cancel"]
        side.in_message = False
    elif input_ is Input.CLOSE_STREAM:
        frames = side.pull()
        if frames:  # unless a response still waits for window
            assert frames[-1].HasField("close_stream")
        kinds = [f.WhichOneof("frame") for f in side.sent]
        assert "response_headers" in kinds or response_before is not P.OPEN
        assert not proto.is_open(SID)
    elif input_ is Input.NEW_STREAM_SENT:
        assert result[0].HasField("new_stream")
    elif input_ in ENVELOPES:
        implied = (
            [HeadersReceived(stream_id=SID, metadata=())]
            if response_before is P.OPEN and side.client
            else []
        )
        data = b"r" if side.client else b"q"
        assert result == [*implied, DataReceived(stream_id=SID, data=data, end_of_message=True)]
    elif input_ in MORE_DATA:
        assert result == [DataReceived(stream_id=SID, data=b"y", end_of_message=True)]
        side.in_message = False
    elif input_ is Input.RECV_RESPONSE_HEADERS:
        assert result == [HeadersReceived(stream_id=SID, metadata=())]
    elif input_ is Input.RECV_HALF_CLOSE:
        assert result == [HalfClosed(stream_id=SID)]
    elif input_ is Input.RECV_CLOSE_STREAM:
        if side.in_message:
            status = StatusProto(
                code=Status.INTERNAL.value,
                message="tunnel server closed the stream in the middle of a message",
            )
            assert result == [StreamEnded(stream_id=SID, status=status, trailers=())]
        else:
            assert result == [StreamEnded(stream_id=SID, status=None, trailers=())]
        side.in_message = False
        assert not proto.is_open(SID)
    elif input_ is Input.RECV_CANCEL:  # of a stream that is over: its responses go
        assert result == []
        assert not any(isinstance(item, OutboundMessage) for item in queued)
        assert proto.buffered_message_bytes(SID) == 0
    elif input_ is Input.RECV_WINDOW_UPDATE:
        assert result == []
        if stream is not None and window is not None:
            assert stream.queue.window == min(window + 10, MAX_WINDOW)
    else:
        raise AssertionError(f"no effect check for {input_.name}")


# -- the property ---------------------------------------------------------------------


def inputs_of(side: Side) -> list[tuple[str, Input]]:
    feeds = CLIENT_INPUTS if side.client else SERVER_INPUTS
    return [(half, input_) for half, inputs in feeds.items() for input_ in inputs]


@SETTINGS
@given(
    st.data(),
    st.booleans(),
    st.sampled_from(list(Cardinality)),
    st.booleans(),
)
def test_every_state_and_input_does_what_the_table_says(
    data: st.DataObject, client: bool, cardinality: Cardinality, flow_control: bool
) -> None:
    side = new_side(cardinality, client=client, flow_control=flow_control)
    half, input_ = data.draw(st.sampled_from(inputs_of(side)), label="input")
    # new_stream leaves once, first.
    states = [P.IDLE] if input_ is Input.NEW_STREAM_SENT else reachable(side, half)
    target = data.draw(st.sampled_from(states), label="state")
    other_half = "response" if half == "request" else "request"
    if target in (R.OVER, P.OVER):
        request_state, response_state = R.OVER, P.OVER
    else:
        others = [s for s in reachable(side, other_half) if s not in (R.OVER, P.OVER)]
        other = data.draw(st.sampled_from(others), label="other half")
        request_state, response_state = (target, other) if half == "request" else (other, target)
    # A message half received, where the input could continue it.
    request_rules, response_rules = RULES[cardinality]
    rules = request_rules if half == "request" else response_rules
    side.in_message = input_ in MORE_DATA and isinstance(rules[target][input_], Go)
    reach(data, side, request_state, response_state)
    invariants.check(side.proto)
    event(f"{'client' if client else 'server'}: {target.name} x {input_.name}")
    check_step(side, half, input_)
    # A few more inputs, each held to the table from wherever the stream is.
    for _ in range(data.draw(st.integers(0, 6), label="more inputs")):
        if side.proto.state.name == "FAILED":
            break
        half, input_ = data.draw(st.sampled_from(inputs_of(side)), label="next input")
        if input_ is Input.NEW_STREAM_SENT and side.state("response") is not P.IDLE:
            continue  # new_stream leaves once, first
        check_step(side, half, input_)
