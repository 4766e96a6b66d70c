"""The tunnel server core with a fallback: which names it accepts, and how.

With ``fallback=<cardinality>``, a name no handler registered opens a stream
of that cardinality instead of being refused UNIMPLEMENTED; everything else
about creation (ill-formed names, shutdown, revisions) is unchanged.
"""

from __future__ import annotations

from grpclib.const import Cardinality, Status

from tunnel._core.connection import KEEPALIVE_METHOD
from tunnel._core.events import DataReceived, HalfClosed

from .helpers import (
    BIDI,
    METHODS,
    UNARY,
    drain_server,
    half_close,
    negotiated_server,
    new_stream,
    of_type,
    opened,
    request,
)
from .test_streams import refusal

BIDI_FALLBACK = Cardinality.STREAM_STREAM


def test_an_unregistered_name_opens_with_the_fallback_cardinality() -> None:
    server = negotiated_server(fallback=BIDI_FALLBACK)
    event = opened(server.receive_frame(new_stream(1, "no.Such/Method")))
    assert (event.method, event.cardinality) == ("/no.Such/Method", BIDI_FALLBACK)


def test_registered_methods_keep_their_own_cardinality() -> None:
    server = negotiated_server(fallback=BIDI_FALLBACK)
    assert opened(server.receive_frame(new_stream(1, UNARY))).cardinality is METHODS[UNARY]
    assert opened(server.receive_frame(new_stream(2, BIDI))).cardinality is METHODS[BIDI]


def test_a_fallback_stream_takes_any_number_of_messages_both_ways() -> None:
    server = negotiated_server(fallback=BIDI_FALLBACK)
    server.receive_frame(new_stream(1, "/no.Such/Method"))
    events = [*server.receive_frame(request(1, b"a")), *server.receive_frame(request(1, b"b"))]
    events += server.receive_frame(half_close(1))
    assert [e.data for e in of_type(events, DataReceived)] == [b"a", b"b"]
    assert len(of_type(events, HalfClosed)) == 1
    server.send_message(1, b"x")
    server.send_message(1, b"y")
    server.close_stream(1, None)
    sent = [f.response_message.data for f in drain_server(server) if f.HasField("response_message")]
    assert sent == [b"x", b"y"]


def test_ill_formed_names_are_still_refused() -> None:
    server = negotiated_server(fallback=BIDI_FALLBACK)
    assert server.receive_frame(new_stream(1, "not-a-method")) == []
    code, _ = refusal(drain_server(server))
    assert code == Status.INVALID_ARGUMENT.value


def test_a_server_shutting_down_refuses_fallback_names_too() -> None:
    server = negotiated_server(fallback=BIDI_FALLBACK)
    server.initiate_shutdown()
    assert server.receive_frame(new_stream(1, "/no.Such/Method")) == []
    assert refusal(drain_server(server)) == (Status.UNAVAILABLE.value, "server is shutting down")


def test_without_a_fallback_unregistered_names_are_refused() -> None:
    server = negotiated_server()
    assert server.receive_frame(new_stream(1, "/no.Such/Method")) == []
    assert refusal(drain_server(server)) == (
        Status.UNIMPLEMENTED.value,
        "no.Such/Method not implemented",
    )


def test_the_keepalive_probe_never_reaches_a_fallback() -> None:
    """A tunnel client's keepalive probe is answered at once: refused, as always."""
    server = negotiated_server(fallback=BIDI_FALLBACK)
    assert server.receive_frame(new_stream(1, KEEPALIVE_METHOD)) == []
    code, _ = refusal(drain_server(server))
    assert code == Status.UNIMPLEMENTED.value
