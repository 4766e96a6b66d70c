"""Hand-made frames that once answered wrongly, end to end on loopback.

* Metadata no HTTP/2 peer could send (a key ending in a newline, a value
  with CR LF or NUL) fails its call with INTERNAL naming the key, before any
  handler runs; the tunnel lives on (issue 9, point 4).
* An undecodable frame ends the tunnel with INTERNAL "tunnel protocol
  error: ...", one concise log line (rate-limited), no traceback (point 5).
* A deadline already past when the call arrives answers DEADLINE_EXCEEDED,
  without running the handler and without an error logged (point 6).
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from google.protobuf.empty_pb2 import Empty
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.hostile import (
    OPEN_REVERSE_TUNNEL,
    OPEN_TUNNEL,
    RawTunnelServer,
    call_status,
    write_frame,
    write_raw,
)
from tests.integration.support import (
    PROBE,
    TEST_TIMEOUT,
    Probe,
    connected,
    serving,
    tunnel_over,
)
from tunnel import _violations
from tunnel._core.framing import frame_prefix
from tunnel._pb.tunnel_pb2 import (
    REVISION_ONE,
    REVISION_ZERO,
    ClientToServer,
    MessageData,
    Metadata,
    NewStream,
    ServerToClient,
    Settings,
)
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing._pb.grpchantesting import TestServiceStub as Stub

UNARY = f"/{PROBE}/Unary"


class Recording:
    """A Probe whose unary handler records the metadata it saw and echoes."""

    def __init__(self) -> None:
        self.seen: list[dict[str, Any]] = []

    async def unary(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        self.seen.append(dict(stream.metadata or {}))
        await stream.recv_message()
        await stream.send_message(Message(payload=b"ok"))

    def service(self) -> Probe:
        return Probe(Unary=(Cardinality.UNARY_UNARY, self.unary))


def unary_frames(stream_id: int, headers: dict[str, list[str]]) -> list[ClientToServer]:
    md = Metadata()
    for key, values in headers.items():
        md.md[key].val.extend(values)
    data = bytes(Message(payload=b"hi"))
    return [
        ClientToServer(
            stream_id=stream_id,
            new_stream=NewStream(
                method_name=UNARY,
                request_headers=md,
                initial_window_size=65_536,
                protocol_revision=REVISION_ONE,
            ),
        ),
        ClientToServer(stream_id=stream_id, request_message=MessageData(size=len(data), data=data)),
        ClientToServer(stream_id=stream_id, half_close=Empty()),
    ]


async def close_of(stream: Any, stream_id: int) -> Any:
    """The ``close_stream`` of a stream, read off a raw carrying call."""
    while True:
        frame = await stream.recv_message()
        assert frame is not None, "the carrying call ended"
        if frame.stream_id == stream_id and frame.HasField("close_stream"):
            return frame.close_stream


async def open_raw_tunnel(
    recording: Recording, attack: Any, caplog: pytest.LogCaptureFixture
) -> GRPCError | None:
    handler = tunnel.TunnelServiceHandler([recording.service()])
    with caplog.at_level(logging.INFO):
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            serving([handler]) as served,
            connected(served.port) as channel,
        ):
            return await call_status(channel, OPEN_TUNNEL, attack)


# -- point 4: metadata no HTTP/2 peer could send ---------------------------------------


async def test_request_metadata_no_http2_peer_could_send_fails_before_the_handler(
    caplog: pytest.LogCaptureFixture,
) -> None:
    recording = Recording()
    statuses: list[Any] = []

    async def attack(stream: grpclib.client.Stream[Any, Any]) -> None:
        for stream_id, headers in [
            (1, {"x-user\n": ["a"]}),
            (3, {"x-ok": ["a\r\nx-injected: 1\x00"]}),
            (5, {"x-ok": ["fine"], "x-empty": [""]}),
        ]:
            for frame in unary_frames(stream_id, headers):
                await write_frame(stream, frame)
            statuses.append((await close_of(stream, stream_id)).status)

    assert await open_raw_tunnel(recording, attack, caplog) is None
    user, injected, fine = statuses
    assert user.code == Status.INTERNAL.value and "'x-user\\n'" in user.message
    assert injected.code == Status.INTERNAL.value and "'x-ok'" in injected.message
    assert fine.code == Status.OK.value
    # Only the third stream reached the handler, with what it sent.
    assert recording.seen == [{"x-ok": "fine", "x-empty": ""}]


async def test_response_metadata_no_http2_peer_could_send_fails_the_call() -> None:
    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        settings = Settings(
            supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE], initial_window_size=65_536
        )
        await stream.send_message(ServerToClient(stream_id=-1, settings=settings))
        answers: list[ServerToClient] = []
        headers = ServerToClient(stream_id=1)
        headers.response_headers.md["x-bad\n"].val.append("v")
        answers.append(headers)
        trailers = ServerToClient(stream_id=2)
        trailers.close_stream.response_trailers.md["x-t"].val.append("a\r\nb: c")
        answers.append(trailers)
        for stream_id in (3,):
            reply = bytes(Message(payload=b"ok"))
            answers.append(
                ServerToClient(
                    stream_id=stream_id,
                    response_message=MessageData(size=len(reply), data=reply),
                )
            )
            done = ServerToClient(stream_id=stream_id)
            done.close_stream.response_trailers.SetInParent()
            answers.append(done)
        expected = 1
        async for frame in stream:
            if frame.HasField("half_close") and frame.stream_id == expected:
                for answer in answers:
                    if answer.stream_id == expected:
                        await stream.send_message(answer)
                expected += 1

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([RawTunnelServer(behave)]) as served,
        tunnel_over(served.port) as tunneled,
    ):
        stub = Stub(tunneled)
        with pytest.raises(GRPCError) as headers_failed:
            await stub.unary(Message())
        with pytest.raises(GRPCError) as trailers_failed:
            await stub.unary(Message())
        assert (await stub.unary(Message())).payload == b"ok"  # the tunnel lives on
    assert headers_failed.value.status is Status.INTERNAL
    assert "'x-bad\\n'" in (headers_failed.value.message or "")
    assert trailers_failed.value.status is Status.INTERNAL
    assert "'x-t'" in (trailers_failed.value.message or "")


# -- point 5: undecodable frames --------------------------------------------------------

BAD_PROTOBUF = b"\xff\xff\xff\xff"
BAD_UTF8 = (
    ClientToServer(stream_id=1, new_stream=NewStream(method_name="ab"))
    .SerializeToString()
    .replace(b"ab", b"\xff\xfe")
)


@pytest.mark.parametrize("garbage", [BAD_PROTOBUF, BAD_UTF8], ids=["protobuf", "utf8"])
async def test_undecodable_frame_is_a_protocol_error_logged_once(
    garbage: bytes, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _violations, "_log", _violations.RateLimitedLog(logging.getLogger("tunnel"))
    )

    async def attack(stream: grpclib.client.Stream[Any, Any]) -> None:
        await write_raw(stream, frame_prefix(len(garbage)) + garbage)

    status = await open_raw_tunnel(Recording(), attack, caplog)
    assert status is not None
    assert status.status is Status.INTERNAL
    assert (status.message or "").startswith("tunnel protocol error: undecodable frame (")
    # One concise line, no traceback, nothing from grpclib's "Application error".
    assert [r.levelno for r in caplog.records if r.levelno >= logging.WARNING] == [logging.WARNING]
    (record,) = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert record.name == "tunnel" and record.exc_info is None
    assert "ended: INTERNAL tunnel protocol error: undecodable frame" in record.getMessage()
    assert "\n" not in record.getMessage()


async def test_protocol_errors_are_logged_at_a_bounded_rate(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(
        _violations,
        "_log",
        _violations.RateLimitedLog(logging.getLogger("tunnel"), lines=3, period=3600),
    )

    async def attack(stream: grpclib.client.Stream[Any, Any]) -> None:
        await write_raw(stream, frame_prefix(len(BAD_PROTOBUF)) + BAD_PROTOBUF)

    handler = tunnel.TunnelServiceHandler([Recording().service()])
    statuses = []
    with caplog.at_level(logging.INFO):
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            serving([handler]) as served,
            connected(served.port) as channel,
        ):
            for _ in range(10):
                statuses.append(await call_status(channel, OPEN_TUNNEL, attack))
                statuses.append(await call_status(channel, OPEN_REVERSE_TUNNEL, attack))
    assert {(s.status if s else None) for s in statuses} == {Status.INTERNAL}
    assert len([r for r in caplog.records if r.levelno >= logging.WARNING]) == 3


def test_rate_limited_log_says_how_many_lines_it_left_out(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [0.0]
    log = _violations.RateLimitedLog(
        logging.getLogger("tunnel"), lines=2, period=60, clock=lambda: now[0]
    )
    with caplog.at_level(logging.WARNING, logger="tunnel"):
        assert [log.warning(f"line {i}") for i in range(5)] == [True, True, False, False, False]
        now[0] = 60.0
        assert log.warning("later")
    assert [r.getMessage() for r in caplog.records] == [
        "line 0",
        "line 1",
        "later (3 similar lines left out before this one)",
    ]


async def test_undecodable_frame_ends_a_forward_client_tunnel() -> None:
    async def behave(stream: grpclib.server.Stream[Any, Any]) -> None:
        settings = Settings(
            supported_protocol_revisions=[REVISION_ZERO, REVISION_ONE], initial_window_size=65_536
        )
        await write_frame(stream, ServerToClient(stream_id=-1, settings=settings))
        await stream.recv_message()  # the call's new_stream
        await write_raw(stream, frame_prefix(len(BAD_PROTOBUF)) + BAD_PROTOBUF)
        await asyncio.Event().wait()

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([RawTunnelServer(behave)]) as served,
        tunnel_over(served.port) as tunneled,
    ):
        with pytest.raises(GRPCError) as exc_info:
            await Stub(tunneled).unary(Message())
        await tunneled.wait_closed()
    assert exc_info.value.status is Status.UNAVAILABLE
    assert "undecodable frame" in (exc_info.value.message or "")
    assert isinstance(tunneled.error, tunnel.RemoteProtocolError)


# -- point 6: a deadline already past ---------------------------------------------------------


@pytest.mark.parametrize("timeout", ["0n", "1n"])
async def test_deadline_past_on_arrival_is_deadline_exceeded(
    timeout: str, caplog: pytest.LogCaptureFixture
) -> None:
    recording = Recording()
    statuses: list[Any] = []

    async def attack(stream: grpclib.client.Stream[Any, Any]) -> None:
        for frame in unary_frames(1, {"grpc-timeout": [timeout]}):
            await write_frame(stream, frame)
        statuses.append((await close_of(stream, 1)).status)

    assert await open_raw_tunnel(recording, attack, caplog) is None
    (status,) = statuses
    assert status.code == Status.DEADLINE_EXCEEDED.value
    assert recording.seen == []  # the handler never ran
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]
