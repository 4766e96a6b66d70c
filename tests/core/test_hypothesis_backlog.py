"""Hypothesis: the counts that bound a tunnel stay true whatever the peer does.

The driver stops reading while ``backlog()`` is high and refuses streams
beyond ``max_concurrent_streams`` by ``active_streams``; both must match the
protocol object's real state after any interleaving of streams opened,
refused, sent on, cancelled and closed, and of frames delivered in part
(a peer that reads slowly, or not at all for a while).  Once every frame
has been delivered, nothing is left in the backlog on either end.
"""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from tests.core.helpers import BIDI, METHODS, Pair, wire
from tunnel._core import TunnelClientProtocol, TunnelServerProtocol
from tunnel._core.events import DataReceived, StreamOpened
from tunnel._core.states import ResponseState

ACTIONS = st.lists(
    st.tuples(
        st.sampled_from(
            ["open", "open_unknown", "send", "cancel", "close", "server_send", "deliver", "ack"]
        ),
        st.integers(min_value=0, max_value=30),
    ),
    max_size=60,
)


def true_backlog(end: TunnelClientProtocol | TunnelServerProtocol) -> int:
    finishing = sum(1 for s in end._streams.values() if s.response is ResponseState.OVER)
    return len(end._control) + finishing


def true_active(end: TunnelClientProtocol | TunnelServerProtocol) -> int:
    return sum(1 for s in end._streams.values() if s.response is not ResponseState.OVER)


def check(pair: Pair) -> None:
    for end in (pair.client, pair.server):
        assert end.backlog() == true_backlog(end)
        assert end.active_streams == true_active(end)
        assert 0 <= end.streams_in_use <= end.active_streams
    limit = pair.server.max_concurrent_streams
    assert limit is None or pair.server.active_streams <= limit


def deliver(pair: Pair, n: int) -> None:
    """Move at most *n* frames each way (a peer that reads only a little)."""
    client: TunnelClientProtocol = pair.client
    server: TunnelServerProtocol = pair.server
    for _ in range(n):
        frame = server.next_frame()
        if frame is None:
            break
        pair.client_events += client.receive_frame(wire(frame))
    for _ in range(n):
        c2s = client.next_frame()
        if c2s is None:
            break
        pair.server_events += server.receive_frame(wire(c2s))


@settings(max_examples=300, deadline=None)
@given(actions=ACTIONS, limit=st.integers(min_value=1, max_value=5))
def test_backlog_and_active_streams_match_the_state(
    actions: list[tuple[str, int]], limit: int
) -> None:
    pair = Pair()
    pair.server.max_concurrent_streams = limit
    opened: list[int] = []
    acked = 0
    for action, n in actions:
        client_open = [i for i in opened if pair.client.is_open(i)]
        server_open = [
            e.stream_id
            for e in pair.server_events
            if isinstance(e, StreamOpened) and pair.server.is_open(e.stream_id)
        ]
        if action == "open":
            opened.append(pair.client.open_stream(BIDI, (), METHODS[BIDI]))
        elif action == "open_unknown":
            opened.append(pair.client.open_stream("/nobody/Home", (), METHODS[BIDI]))
        elif action == "send" and client_open:
            pair.client.send_message(client_open[n % len(client_open)], b"x" * (n * 1000))
        elif action == "cancel" and client_open:
            pair.client.cancel(client_open[n % len(client_open)])
        elif action == "close" and server_open:
            pair.server.close_stream(server_open[n % len(server_open)], None)
        elif action == "server_send" and server_open:
            pair.server.send_message(server_open[n % len(server_open)], b"y" * (n * 500))
        elif action == "deliver":
            deliver(pair, n)
        elif action == "ack":
            # The application consumes what arrived (and only that).
            for event in pair.client_events[acked:]:
                if isinstance(event, DataReceived):
                    pair.client.acknowledge(event.stream_id, len(event.data))
            acked = len(pair.client_events)
        check(pair)
    pair.pump()
    check(pair)
    assert pair.server.backlog() == 0 and pair.client.backlog() == 0
