"""Reassembly of one stream's chunks, and the window it gives back (``tunnel._inbox``).

The window goes back as the application consumes: when it reads, or while it
waits for a message (``reading``), as chunks arrive.  Either way a peer can
make a stream buffer no more than one window of unread data, plus the
message being assembled.
"""

from __future__ import annotations

from tunnel._inbox import Inbox


class Acks:
    """What the inbox gave back, chunk by chunk."""

    def __init__(self) -> None:
        self.given: list[int] = []

    def __call__(self, n: int) -> None:
        self.given.append(n)


def test_chunks_wait_unacknowledged_until_the_application_reads() -> None:
    acks = Acks()
    inbox = Inbox(acks)
    assert inbox.put(b"ab", False) is True
    assert inbox.put(b"cd", True) is True
    assert acks.given == []
    assert inbox.take() == b"abcd"
    assert acks.given == [2, 2]
    assert inbox.take() is None


def test_a_waiting_reader_consumes_chunks_as_they_arrive_and_wakes_for_the_whole() -> None:
    acks = Acks()
    inbox = Inbox(acks)
    inbox.reading = True
    assert inbox.put(b"ab", False) is False  # consumed at once: no wake-up
    assert inbox.put(b"cd", False) is False
    assert acks.given == [2, 2]
    assert inbox.put(b"ef", True) is True  # the message is whole
    assert acks.given == [2, 2, 2]
    assert inbox.take() == b"abcdef"
    assert inbox.take() is None


def test_a_waiting_reader_holds_at_most_one_whole_message() -> None:
    """After one whole message, chunks wait unacknowledged for the next read."""
    acks = Acks()
    inbox = Inbox(acks)
    inbox.reading = True
    assert inbox.put(b"one", True) is True
    assert inbox.put(b"tw", False) is True
    assert inbox.put(b"o", True) is True
    assert acks.given == [3]
    assert inbox.take() == b"one"
    assert inbox.take() == b"two"
    assert acks.given == [3, 2, 1]


def test_chunks_that_arrived_before_the_wait_are_read_first() -> None:
    acks = Acks()
    inbox = Inbox(acks)
    inbox.put(b"first", True)
    inbox.reading = True  # a reader that has not taken yet does not absorb
    assert inbox.put(b"second", True) is True
    assert acks.given == []
    assert inbox.take() == b"first"
    assert inbox.take() == b"second"


def test_discard_gives_back_what_is_unread_and_drops_a_partial_message() -> None:
    acks = Acks()
    inbox = Inbox(acks)
    inbox.reading = True
    inbox.put(b"abc", False)  # consumed into the partial message
    inbox.reading = False
    inbox.put(b"de", False)
    inbox.discard()
    assert acks.given == [3, 2]
    inbox.put(b"x", True)
    assert inbox.take() == b"x"


def test_clear_drops_everything_without_giving_window_back() -> None:
    acks = Acks()
    inbox = Inbox(acks)
    inbox.reading = True
    inbox.put(b"whole", True)
    inbox.put(b"unread", True)
    inbox.clear()
    assert inbox.take() is None
    assert acks.given == [5]
