"""Negotiation: the Settings frame, revision choice, and what breaks it."""

from __future__ import annotations

import base64

import pytest

from tunnel._core import TunnelClientProtocol, TunnelServerProtocol
from tunnel._core.events import Negotiated
from tunnel._pb.tunnel_pb2 import REVISION_ONE, REVISION_ZERO, ServerToClient, Settings
from tunnel.errors import LocalProtocolError, NegotiationError

from .helpers import (
    METHODS,
    UNARY,
    Pair,
    drain_client,
    drain_server,
    response_headers,
    settings,
)


def test_server_sends_settings_on_stream_minus_one_first() -> None:
    server = TunnelServerProtocol(METHODS, peer_negotiates=True)
    frames = drain_server(server)
    assert frames == [
        ServerToClient(
            stream_id=-1,
            settings=Settings(
                supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE],
                initial_window_size=65_536,
            ),
        )
    ]


def test_settings_frame_is_byte_identical_to_the_reference() -> None:
    # raw_b64 of the Settings frame in vectors/fwd_fc_unary_ok.jsonl (no map in it,
    # so the encoding is unique): the revision list must be packed.
    server = TunnelServerProtocol(METHODS, peer_negotiates=True)
    (frame,) = drain_server(server)
    assert frame.SerializeToString() == base64.b64decode("CP///////////wEyCAoCAAEQgIAE")


def test_server_without_flow_control_offers_only_revision_zero_with_full_window() -> None:
    server = TunnelServerProtocol(METHODS, peer_negotiates=True, disable_flow_control=True)
    (frame,) = drain_server(server)
    assert list(frame.settings.supported_protocol_revisions) == [REVISION_ZERO]
    assert frame.settings.initial_window_size == 65_536


def test_server_sends_no_settings_to_a_peer_that_does_not_negotiate() -> None:
    server = TunnelServerProtocol(METHODS, peer_negotiates=False)
    assert drain_server(server) == []


@pytest.mark.parametrize(
    ("client_fc", "server_fc", "revision"),
    [(True, True, REVISION_ONE), (False, True, REVISION_ZERO), (True, False, REVISION_ZERO)],
)
def test_client_picks_the_highest_common_revision(
    client_fc: bool, server_fc: bool, revision: int
) -> None:
    pair = Pair(client_flow_control=client_fc, server_flow_control=server_fc)
    assert pair.client_events == [Negotiated(revision=revision)]
    assert pair.client.revision == revision
    pair.open(UNARY)
    assert pair.c2s[0].new_stream.protocol_revision == revision
    # initial_window_size travels even under revision zero, as the reference does.
    assert pair.c2s[0].new_stream.initial_window_size == 65_536


def test_client_picks_highest_revision_whatever_the_order_offered() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    assert client.receive_frame(settings(1, 0)) == [Negotiated(revision=REVISION_ONE)]


def test_client_waits_for_settings_before_creating_streams() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    assert not client.ready
    with pytest.raises(LocalProtocolError):
        client.open_stream(UNARY, (), METHODS[UNARY])
    assert drain_client(client) == []


def test_without_the_header_the_client_uses_revision_zero_at_once() -> None:
    client = TunnelClientProtocol(peer_negotiates=False)
    assert client.ready
    assert client.revision == REVISION_ZERO
    client.open_stream(UNARY, (), METHODS[UNARY])
    (frame,) = drain_client(client)
    assert frame.new_stream.protocol_revision == REVISION_ZERO


def test_legacy_pair_works_without_settings() -> None:
    pair = Pair(negotiate=False)
    assert pair.s2c == []
    stream_id = pair.open(UNARY)
    pair.client.send_message(stream_id, b"hi")
    pair.client.half_close(stream_id)
    _, server_events = pair.pump()
    assert b"".join(e.data for e in server_events if hasattr(e, "data")) == b"hi"
    # Revision zero: no window updates, even when the app consumes data.
    pair.server.acknowledge(stream_id, 2)
    assert drain_server(pair.server) == []


@pytest.mark.parametrize(
    "first",
    [
        response_headers(1),
        settings(0, 1, stream_id=0),
        settings(0, 1, stream_id=1),
        ServerToClient(stream_id=-1),
        ServerToClient(stream_id=-1, window_update=5),
    ],
    ids=["headers", "settings-on-0", "settings-on-1", "empty", "window-update"],
)
def test_first_frame_other_than_settings_on_minus_one_is_a_negotiation_error(
    first: ServerToClient,
) -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    with pytest.raises(NegotiationError):
        client.receive_frame(first)
    assert not client.ready


def test_no_common_revision_is_a_negotiation_error() -> None:
    client = TunnelClientProtocol(peer_negotiates=True, disable_flow_control=True)
    with pytest.raises(NegotiationError, match="no protocol revision in common"):
        client.receive_frame(settings(REVISION_ONE))
    assert not client.ready


def test_empty_revision_list_is_a_negotiation_error() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    with pytest.raises(NegotiationError):
        client.receive_frame(settings())


def test_client_send_window_comes_from_settings() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    client.receive_frame(settings(0, 1, window=1000))
    stream_id = client.open_stream(UNARY, (), METHODS[UNARY])
    client.send_message(stream_id, b"x" * 3000)
    frames = drain_client(client)
    assert [f.WhichOneof("frame") for f in frames] == ["new_stream", "request_message"]
    assert len(frames[1].request_message.data) == 1000
    assert frames[1].request_message.size == 3000


def test_repeated_settings_after_negotiation_are_ignored() -> None:
    client = TunnelClientProtocol(peer_negotiates=True)
    client.receive_frame(settings(0, 1))
    assert client.receive_frame(settings(0)) == []
    assert client.revision == REVISION_ONE
