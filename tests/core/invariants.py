"""What must hold of a protocol object between any two calls.

The counts the driver and the statistics read (``active_streams``,
``streams_in_use``, ``backlog``) must agree with the stream table; the
round-robin ring must hold exactly the streams marked scheduled, and every
stream with something it may send; each queue's byte count must agree with
what it holds; windows never go below zero; and a FAILED object holds
nothing at all.  The property tests call ``check`` after every step, and
``failed_for_good`` once a frame ended the tunnel.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial
from typing import Any

import pytest

from tunnel._core import TunnelClientProtocol
from tunnel._core.flow import MAX_WINDOW, OutboundMessage
from tunnel._core.states import RequestState, ResponseState, TunnelFailedError, TunnelState
from tunnel._pb.tunnel_pb2 import ClientToServer
from tunnel.errors import RemoteProtocolError

from .helpers import BIDI, METHODS, close, new_stream

OVER = ResponseState.OVER


def check(proto: Any) -> None:
    streams = proto._streams
    ring = list(proto._ring)
    live = [st for st in streams.values() if st.response is not OVER]
    over = [st for st in streams.values() if st.response is OVER]
    assert proto.active_streams == len(live)
    assert proto._finishing == len(over)
    assert proto.backlog() == len(proto._control) + len(over)
    assert proto.streams_in_use == sum(st.counted for st in live)
    assert proto.has_frames() == bool(proto._control or ring)
    assert len(ring) == len({id(st) for st in ring}), "a stream is in the ring twice"
    for st in ring:
        assert st.scheduled
        assert streams.get(st.id) is st, "the ring holds a stream that left the table"
    for stream_id, st in streams.items():
        assert st.id == stream_id
        assert 0 < stream_id <= proto._last_id
        assert (st.request is RequestState.OVER) == (st.response is OVER)
        assert st.scheduled == any(r is st for r in ring)
        queue = st.queue
        if queue.ready():
            assert st.scheduled, f"stream {stream_id} has a frame to send but is not scheduled"
        if st.response is OVER:
            assert len(queue) or st.scheduled, f"stream {stream_id} is over and idle, not forgotten"
        items = list(queue._items)
        assert queue.buffered == sum(m.remaining for m in items if isinstance(m, OutboundMessage))
        assert proto.buffered_message_bytes(stream_id) == queue.buffered
        assert queue.window is None or queue.window >= 0
        window = st.inbound.window
        assert window is None or 0 <= window <= MAX_WINDOW
        if st.response is ResponseState.IDLE:
            # The explicit state agrees with what the queue says: the
            # stream's new_stream frame has not left.
            head = queue.first()
            assert isinstance(head, ClientToServer) and head.HasField("new_stream")
        assert proto.is_open(stream_id) == (st.response is not OVER)
    for stream_id, frame in proto._queued_updates.items():
        assert frame.stream_id == stream_id
        assert any(f is frame for f in proto._control)
    if proto.state is TunnelState.FAILED:
        assert not streams and not ring and not proto._control
        assert proto.active_streams == 0 and proto.backlog() == 0


def failed_for_good(proto: Any, stream_ids: Iterable[int]) -> None:
    """A protocol object that raised ``RemoteProtocolError`` stays failed.

    Every later frame raises again; no stream can be opened; every call
    that would send on a stream it had raises ``TunnelFailedError``; a
    cancel or an acknowledgement does nothing (there is nothing left to
    cancel or to open, and the code that ends calls must not trip);
    nothing is left to send.
    """
    assert proto.state is TunnelState.FAILED
    check(proto)
    client = isinstance(proto, TunnelClientProtocol)
    later = close(proto._last_id or 1) if client else new_stream(proto._last_id + 1)
    with pytest.raises(RemoteProtocolError, match="already failed"):
        proto.receive_frame(later)
    if client:
        with pytest.raises(TunnelFailedError, match=r"^tunnel closed: "):
            proto.open_stream(BIDI, (), METHODS[BIDI])
        assert not proto.ready
    for stream_id in stream_ids:
        if client:
            sends = [
                partial(proto.send_message, stream_id, b"late"),
                partial(proto.half_close, stream_id),
            ]
            proto.cancel(stream_id)
        else:
            sends = [
                partial(proto.send_headers, stream_id, ()),
                partial(proto.send_message, stream_id, b"late"),
                partial(proto.close_stream, stream_id, None),
            ]
        for send in sends:
            with pytest.raises(TunnelFailedError, match=r"^tunnel closed: "):
                send()
        proto.acknowledge(stream_id, 1)
        assert not proto.is_open(stream_id)
    assert proto.next_frame() is None
    check(proto)
