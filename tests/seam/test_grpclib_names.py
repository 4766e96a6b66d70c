"""What ``tunnel._seam`` assumes of grpclib's private names and classes.

Our channels and streams subclass grpclib's without running their
``__init__``; they rely on a few private names for types, events and
deadlines.  Each assumption is pinned here against grpclib itself, so a
release that changes one fails by name.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import Callable
from typing import Any

import grpclib.client
import grpclib.events
import grpclib.server
import pytest
from grpclib.encoding.proto import ProtoCodec, ProtoStatusDetailsCodec
from grpclib.metadata import Deadline
from grpclib.utils import DeadlineWrapper
from multidict import MultiDict

from tunnel import _seam
from tunnel._client_stream import TunnelClientStream
from tunnel._server_stream import TunnelServerStream


def test_metadata_types_are_what_grpclib_hands_around() -> None:
    assert _seam.Metadata is grpclib.metadata._Metadata
    assert _seam.MetadataLike is grpclib.metadata._MetadataLike
    assert isinstance(_seam.Metadata(MultiDict(a="1")), MultiDict)


@pytest.mark.parametrize(
    ("dispatch", "methods"),
    [
        (
            _seam.ChannelEvents,
            [
                "send_request",
                "send_message",
                "recv_initial_metadata",
                "recv_message",
                "recv_trailing_metadata",
            ],
        ),
        (
            _seam.ServerEvents,
            [
                "recv_request",
                "recv_message",
                "send_initial_metadata",
                "send_message",
                "send_trailing_metadata",
            ],
        ),
    ],
)
async def test_event_dispatchers_fire_listeners_added_by_listen(
    dispatch: Callable[[], Any], methods: list[str]
) -> None:
    class Target:
        def __init__(self) -> None:
            self.__dispatch__ = dispatch()

    target = Target()
    for name in methods:
        assert inspect.iscoroutinefunction(getattr(target.__dispatch__, name)), name
    seen: list[object] = []

    async def listener(event: Any) -> None:
        seen.append(event.message)

    grpclib.events.listen(target, grpclib.events.SendMessage, listener)
    (message,) = await target.__dispatch__.send_message("hello")
    assert message == "hello" and seen == ["hello"]


async def test_a_channel_made_without_init_is_usable_where_grpclib_reads_it() -> None:
    class Shell(grpclib.client.Channel):
        def __init__(self) -> None:
            self.__dispatch__ = _seam.become_channel(
                self, codec=ProtoCodec(), status_details_codec=None
            )

    shell = Shell()
    seen: list[object] = []

    async def listener(event: Any) -> None:
        seen.append(event)

    grpclib.events.listen(shell, grpclib.events.SendRequest, listener)
    assert isinstance(shell._codec, ProtoCodec)
    shell.close()  # reads _protocol: no connection, nothing to do
    del shell  # __del__ reads _protocol too, and warns only about a connection


async def test_channel_codecs_are_those_the_channel_was_made_with() -> None:
    codec, details = ProtoCodec(), ProtoStatusDetailsCodec()
    channel = grpclib.client.Channel("127.0.0.1", 1, codec=codec, status_details_codec=details)
    try:
        assert _seam.channel_codecs(channel) == (codec, details)
    finally:
        channel.close()
    # Not a grpclib channel: bad input on purpose.
    assert _seam.channel_codecs(object()) == (None, None)  # type: ignore[arg-type]


async def test_deadline_passed_tells_grpclibs_cancel_from_the_callers() -> None:
    wrapper = DeadlineWrapper()
    assert not _seam.deadline_passed(wrapper)
    with (
        pytest.raises(asyncio.TimeoutError),
        wrapper.start(Deadline.from_timeout(0.01)),
        wrapper,
    ):
        await asyncio.sleep(10)
    assert _seam.deadline_passed(wrapper)


@pytest.mark.parametrize(
    ("ours", "theirs", "used_as_context"),
    [
        (TunnelClientStream, grpclib.client.Stream, True),
        # grpclib enters a server Stream itself (request_handler), never a
        # handler: ours is never entered.
        (TunnelServerStream, grpclib.server.Stream, False),
    ],
)
def test_no_public_method_of_grpclibs_streams_runs_on_ours(
    ours: type, theirs: type, used_as_context: bool
) -> None:
    """Our streams skip grpclib's ``__init__``: every public method must be ours."""
    context = {"__aenter__", "__aexit__"} if used_as_context else set()
    public = {
        name
        for name, value in inspect.getmembers(theirs)
        if callable(value) and (not name.startswith("_") or name in context)
    }
    ours_defined = {
        name
        for klass in ours.__mro__
        if klass.__module__.startswith("tunnel")
        for name in vars(klass)
    }
    inherited_from_grpclib = {
        name for name in public - ours_defined if getattr(ours, name) is getattr(theirs, name)
    }
    # Iterating is grpclib's StreamIterator, which only calls recv_message (ours).
    assert inherited_from_grpclib <= {"__aiter__", "__anext__"}, inherited_from_grpclib
