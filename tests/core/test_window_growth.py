"""Windows that grow while the application keeps up with a peer that fills them.

A receiver grants more than it consumed when the peer had used up nearly all
of a stream's window: the peer only adds what it is granted (PROTOCOL.md),
so the wire stays the reference's, and a bulk transfer needs far fewer
round trips.  Growth is bounded per stream (``max_window_size``) and per
tunnel (``GROWN_WINDOWS``); without ``max_window_size`` the window is fixed,
one update per consumption of exactly what was consumed, as the reference.
"""

from __future__ import annotations

import pytest

from tunnel import TunnelOptions
from tunnel._core.connection import GROWN_WINDOWS

from .helpers import BIDI, SERVER_STREAM, UNARY, Pair, data_of

INITIAL = 65_536
MAX = 1 << 20


def updates_to_client(pair: Pair, start: int) -> list[tuple[int, int]]:
    """(stream id, amount) of every window_update the server sent since ``start``."""
    return [
        (f.stream_id, f.window_update)
        for f in pair.s2c[start:]
        if f.WhichOneof("frame") == "window_update"
    ]


def consume(pair: Pair, stream_id: int, *, by_client: bool = False) -> list[int]:
    """Pump until nothing more arrives; the receiving application consumes
    what arrived in each round and acknowledges it at once, as the driver does
    once per batch.  Returns the bytes that arrived per round."""
    receiver = pair.client if by_client else pair.server
    rounds: list[int] = []
    for _ in range(1000):
        client_events, server_events = pair.pump()
        arrived = len(data_of(client_events if by_client else server_events))
        if not arrived:
            break
        rounds.append(arrived)
        receiver.acknowledge(stream_id, arrived)
    pair.pump()
    return rounds


def send_and_consume(pair: Pair, stream_id: int, size: int) -> list[int]:
    """The client sends ``size`` bytes, which the server's application consumes."""
    for offset in range(0, size, MAX):  # messages of at most 1 MiB (limit: 4 MiB)
        pair.client.send_message(stream_id, b"d" * min(MAX, size - offset))
    rounds = consume(pair, stream_id)
    assert sum(rounds) == size
    return rounds


def stream_to_client(pair: Pair, size: int) -> list[int]:
    """A server-streaming call whose responses (``size`` bytes in messages
    of 1 MiB) the client's application consumes; bytes arrived per round."""
    stream_id = pair.open(SERVER_STREAM)
    pair.client.send_message(stream_id, b"q")
    pair.client.half_close(stream_id)
    pair.pump()
    for _ in range(size // MAX):
        pair.server.send_message(stream_id, b"r" * MAX)
    return consume(pair, stream_id, by_client=True)


def test_a_window_the_peer_fills_grows_to_the_maximum_and_no_further() -> None:
    pair = Pair(max_window_size=MAX)
    stream_id = pair.open(BIDI)
    start = len(pair.s2c)
    rounds = send_and_consume(pair, stream_id, 8 * MAX)
    # Doubling from 64 KiB: 64, 128, 256, 512 KiB, then 1 MiB per round.
    assert rounds[:5] == [INITIAL, 2 * INITIAL, 4 * INITIAL, 8 * INITIAL, MAX]
    assert max(rounds) == MAX
    # A fixed window would take 128 rounds for 8 MiB.
    assert len(rounds) < 16
    granted = sum(n for _, n in updates_to_client(pair, start))
    # Everything consumed came back, and the growth on top of it.
    assert granted == 8 * MAX + (MAX - INITIAL)


def test_without_a_maximum_the_window_is_fixed_as_the_reference() -> None:
    pair = Pair()
    stream_id = pair.open(BIDI)
    start = len(pair.s2c)
    rounds = send_and_consume(pair, stream_id, 1 << 20)
    assert set(rounds) == {INITIAL}
    assert [n for _, n in updates_to_client(pair, start)] == rounds


def test_a_window_the_peer_leaves_mostly_unused_does_not_grow() -> None:
    pair = Pair(max_window_size=MAX)
    stream_id = pair.open(BIDI)
    start = len(pair.s2c)
    for _ in range(50):
        assert send_and_consume(pair, stream_id, 20_000) == [20_000]
    assert [n for _, n in updates_to_client(pair, start)] == [20_000] * 50


def test_the_client_grows_the_windows_of_responses_too() -> None:
    pair = Pair(max_window_size=MAX)
    rounds = stream_to_client(pair, 4 * MAX)
    assert sum(rounds) == 4 * MAX
    assert max(rounds) == MAX


def test_a_new_stream_starts_with_what_the_tunnel_learned() -> None:
    """Streams the peer sends a stream of messages on start at the learned size.

    The server grants it with a ``window_update`` as the stream is accepted
    (its first window was fixed by ``Settings``); the client announces it in
    ``NewStream``.  Unary streams keep the initial window.
    """
    pair = Pair(max_window_size=MAX)
    send_and_consume(pair, pair.open(BIDI), 4 * MAX)
    start = len(pair.s2c)
    second = pair.open(BIDI)
    assert updates_to_client(pair, start) == [(second, MAX - INITIAL)]
    assert send_and_consume(pair, second, 4 * MAX) == [MAX] * 4
    unary = pair.open(UNARY)
    assert all(sid != unary for sid, _ in updates_to_client(pair, start))

    # The same on the client: what it learned from responses goes in NewStream.
    stream_to_client(pair, 4 * MAX)
    later = pair.open(SERVER_STREAM)
    new_streams = [f for f in pair.c2s if f.WhichOneof("frame") == "new_stream"]
    assert new_streams[-1].stream_id == later
    assert new_streams[-1].new_stream.initial_window_size == MAX
    assert new_streams[0].new_stream.initial_window_size == INITIAL


def test_growth_is_bounded_per_tunnel_and_comes_back_when_streams_end() -> None:
    pair = Pair(max_window_size=MAX)
    streams = [pair.open(BIDI) for _ in range(GROWN_WINDOWS + 3)]
    start = len(pair.s2c)
    for stream_id in streams:
        send_and_consume(pair, stream_id, 4 * MAX)
    grown = {sid: -4 * MAX for sid in streams}
    for sid, n in updates_to_client(pair, start):
        grown[sid] += n
    # What each stream was granted beyond what it consumed is its growth.
    assert sum(grown.values()) == GROWN_WINDOWS * (MAX - INITIAL)
    assert all(0 <= g <= MAX - INITIAL for g in grown.values())
    assert [g for g in grown.values() if g == 0], "some streams had to stay at 64 KiB"
    # A stream that ends gives its growth back: a newcomer grows again.
    for stream_id in streams:
        pair.client.half_close(stream_id)
        pair.server.close_stream(stream_id, None)
    pair.pump()
    newcomer = pair.open(BIDI)
    assert max(send_and_consume(pair, newcomer, 4 * MAX)) == MAX


def test_grown_data_is_still_held_to_the_window() -> None:
    """The peer may send what it was granted, growth included, and no more."""
    pair = Pair(max_window_size=MAX)
    stream_id = pair.open(BIDI)
    send_and_consume(pair, stream_id, 4 * MAX)
    for _ in range(4):
        pair.client.send_message(stream_id, b"d" * MAX)
    _, events = pair.pump()
    # Nothing acknowledged: exactly one grown window arrives, then the sender waits.
    assert len(data_of(events)) == MAX
    assert not pair.client.has_frames()


@pytest.mark.parametrize("size", [0, -1, 2**31])
def test_max_window_size_out_of_range_is_refused(size: int) -> None:
    with pytest.raises(ValueError, match="max_window_size"):
        TunnelOptions(max_window_size=size)


def test_options_give_growth_by_default_and_fixed_windows_on_request() -> None:
    assert TunnelOptions().max_window_size == MAX
    fixed = TunnelOptions(max_window_size=INITIAL)._protocol_settings()
    assert fixed["max_window_size"] == INITIAL
