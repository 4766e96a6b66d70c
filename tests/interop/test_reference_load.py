"""Our interop programs send and answer the reference's load as the reference does.

The two ``official_tunneltestclient_*`` transcripts in ../shared/vectors are
the reference's own ``tunneltestclient`` against its ``tunneltestsvr``: the
``internal.SendRPCs`` load (Unary, ClientStream, ServerStream and BidiStream
loops) answered by ``grpchantesting.TestServer``, over a forward tunnel and
over a reverse one. From them this module checks that, paired with the
reference's programs, ours would send and answer the same:

* the reference's transcripts themselves: every complete tunneled stream of a
  method carries the same requests (byte for byte our ``_load`` constants,
  with ``MESSAGES_PER_STREAM`` of them where the method streams requests),
  no request metadata, and gets the same answer (response headers, messages,
  trailers, status); each stream starts with ``new_stream`` (window 65536,
  revision one) and no chunk exceeds 16384 bytes;
* our programs (``run_forward`` of tunnel.testing.client against a server
  built like tunnel.testing.server, and ``run_reverse`` with its
  ``TunnelTester``), recorded frame by frame on a real loopback server: each
  method's streams carry the same requests, metadata and stream settings as
  the reference's, and get the same answers;
* our ``TestService``, sent the reference's own requests over a forward and
  a reverse tunnel, answers as ``grpchantesting.TestServer`` did;
* the reverse transcript's ``TriggerTestRPCs`` call is our method with our
  request message.

Truncation: the recorder stopped at line 2,000, so the last streams of each
transcript are cut off. A stream counts as complete only if its
``new_stream``, the client's ``half_close`` and the server's ``close_stream``
are all in the file and every message it started is whole (``size`` bytes
reassembled from ``request_message``/``response_message`` and the ``more_*``
chunks); the others are left out. At most four streams are open at once in
this load, so at most four can be cut off.

Frames are compared decoded. Messages are compared as decoded
``grpchantesting.Message`` values (Go writes maps in random order) and by
serialized size; the requests, which hold no maps, are also compared as bytes.
Window updates are not compared: their placement depends on timing
(tests/core/test_vectors.py checks flow control against the small transcripts).
Chunk boundaries are not compared either: the reference splits a message
where the send window runs out, which is timing too; only the 16384-byte
limit is a rule.

Our frames are recorded by wrapping ``receive_frame`` of both protocol
classes, so they are the frames each end actually parsed off the wire.

Not done here: feeding the reference's ``ServerToClient`` frames into our
``TunnelClientProtocol``. The truncated, four-way interleaved transcript
cannot be replayed frame for frame (see tests/core/test_vectors.py, which
replays every single-scenario transcript); here our client instead receives
our server's frames, which are shown equal, stream by stream, to the
reference server's.
"""

from __future__ import annotations

import asyncio
import base64
import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from google.protobuf import json_format
from grpclib.const import Cardinality
from grpclib.events import RecvRequest, listen

from tests.conftest import FORWARD, Mode, OpenChannel, StartServer
from tunnel import TunnelOptions, TunnelServiceHandler
from tunnel._core import TunnelClientProtocol, TunnelServerProtocol
from tunnel._pb.tunnel_pb2 import REVISION_ONE, ClientToServer, Metadata, ServerToClient
from tunnel.testing._load import (
    BIDI_REQUEST,
    CLIENT_STREAM_REQUEST,
    MESSAGES_PER_STREAM,
    SERVER_STREAM_REQUEST,
    UNARY_REQUEST,
)
from tunnel.testing._pb import TriggerTestRpCsRequest
from tunnel.testing._pb.grpchantesting import Message
from tunnel.testing.client import run_forward, run_reverse
from tunnel.testing.server import CLIENT_KEY_HEADER, TunnelTester, client_key
from tunnel.testing.service import TestService

VECTORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors"
TRANSCRIPT = {
    "forward": "official_tunneltestclient_forward",
    "reverse": "official_tunneltestclient_reverse",
}
#: The recorder's cut: the official transcripts hold this many lines.
TRUNCATED_AT = 2000
#: Streams of the load open at once (four loops), hence at most cut off.
MAX_CUT_OFF = 4

OPEN_TUNNEL = "/grpctunnel.v1.TunnelService/OpenTunnel"
OPEN_REVERSE_TUNNEL = "/grpctunnel.v1.TunnelService/OpenReverseTunnel"
TRIGGER = "/TunnelTestService/TriggerTestRPCs"
NEGOTIATE = "grpctunnel-negotiate"
KEY = re.compile(r"[0-9a-f]{64}")

#: Upper bound for one run of our programs' load or one replay (they take milliseconds).
RUN_TIMEOUT = 10.0

MAX_CHUNK = 16384
INITIAL_WINDOW = 65536

SERVICE = "/grpchantesting.TestService/"


@dataclass(frozen=True)
class Load:
    """What one loop of the load does: its request and how many go each way."""

    cardinality: Cardinality
    request: Message
    requests: int
    responses: int


LOAD = {
    SERVICE + "Unary": Load(Cardinality.UNARY_UNARY, UNARY_REQUEST, 1, 1),
    SERVICE + "ClientStream": Load(
        Cardinality.STREAM_UNARY, CLIENT_STREAM_REQUEST, MESSAGES_PER_STREAM, 1
    ),
    # TestServer answers a server-streaming call with ``count`` (10) messages.
    SERVICE + "ServerStream": Load(
        Cardinality.UNARY_STREAM, SERVER_STREAM_REQUEST, 1, SERVER_STREAM_REQUEST.count
    ),
    SERVICE + "BidiStream": Load(
        Cardinality.STREAM_STREAM, BIDI_REQUEST, MESSAGES_PER_STREAM, MESSAGES_PER_STREAM
    ),
}

REVERSE = Mode("reverse-fc", tunneled=True, kind="reverse")

pytestmark = pytest.mark.skipif(
    not all((VECTORS / f"{name}.jsonl").is_file() for name in TRANSCRIPT.values()),
    reason=f"{VECTORS} is missing: clone shared/ beside the repository",
)


# -- reassembling streams from frames ---------------------------------------------------

MetadataMap = dict[str, list[str]]


def metadata(md: Metadata) -> MetadataMap:
    return {key: list(values.val) for key, values in md.md.items()}


@dataclass
class _Partial:
    size: int
    data: bytearray


@dataclass
class Stream:
    """One tunneled stream, as both directions' frames show it."""

    stream_id: int
    method: str = ""
    #: Kind of the first frame the tunnel client sent on the stream.
    first_frame: str | None = None
    request_headers: MetadataMap | None = None
    initial_window_size: int | None = None
    protocol_revision: int | None = None
    requests: list[bytes] = field(default_factory=list)
    response_headers: MetadataMap | None = None
    responses: list[bytes] = field(default_factory=list)
    trailers: MetadataMap | None = None
    #: (code, message, detail type URLs); an unset status is OK.
    status: tuple[int, str, list[str]] | None = None
    half_closed: bool = False
    cancelled: bool = False
    closed: bool = False
    #: Every chunk size (first chunks and ``more_*`` data), both directions.
    chunks: list[int] = field(default_factory=list)
    partial: dict[str, _Partial] = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return (
            self.first_frame is not None
            and self.half_closed
            and self.closed
            and not self.cancelled
            and not self.partial
        )

    def _data(self, direction: str, size: int | None, chunk: bytes) -> None:
        self.chunks.append(len(chunk))
        if size is not None:
            assert direction not in self.partial, f"stream {self.stream_id}: message cut short"
            self.partial[direction] = _Partial(size, bytearray())
        part = self.partial[direction]
        part.data += chunk
        assert len(part.data) <= part.size, f"stream {self.stream_id}: message overruns its size"
        if len(part.data) == part.size:
            del self.partial[direction]
            (self.requests if direction == "request" else self.responses).append(bytes(part.data))

    def client_frame(self, frame: ClientToServer) -> None:
        kind = frame.WhichOneof("frame")
        if self.first_frame is None:
            self.first_frame = kind
        if kind == "new_stream":
            ns = frame.new_stream
            self.method = ns.method_name
            self.request_headers = metadata(ns.request_headers)
            self.initial_window_size = ns.initial_window_size
            self.protocol_revision = ns.protocol_revision
        elif kind == "request_message":
            self._data("request", frame.request_message.size, frame.request_message.data)
        elif kind == "more_request_data":
            self._data("request", None, frame.more_request_data)
        elif kind == "half_close":
            self.half_closed = True
        elif kind == "cancel":
            self.cancelled = True

    def server_frame(self, frame: ServerToClient) -> None:
        if self.closed:
            return  # the reference may write after its close_stream; receivers ignore it
        kind = frame.WhichOneof("frame")
        if kind == "response_headers":
            self.response_headers = metadata(frame.response_headers)
        elif kind == "response_message":
            self._data("response", frame.response_message.size, frame.response_message.data)
        elif kind == "more_response_data":
            self._data("response", None, frame.more_response_data)
        elif kind == "close_stream":
            close = frame.close_stream
            self.trailers = metadata(close.response_trailers)
            st = close.status
            self.status = (st.code, st.message, [d.type_url for d in st.details])
            self.closed = True

    # -- what is compared --------------------------------------------------

    def request_side(self) -> dict[str, Any]:
        return {
            "method": self.method,
            "first_frame": self.first_frame,
            "request_headers": self.request_headers,
            "initial_window_size": self.initial_window_size,
            "protocol_revision": self.protocol_revision,
            "requests": [Message().parse(r) for r in self.requests],
            "request_bytes": self.requests,
        }

    def answer(self) -> dict[str, Any]:
        return {
            "response_headers": self.response_headers,
            "responses": [Message().parse(r) for r in self.responses],
            "response_sizes": [len(r) for r in self.responses],
            "trailers": self.trailers,
            "status": self.status,
        }


def reassemble(frames: list[ClientToServer | ServerToClient]) -> dict[int, Stream]:
    """The tunneled streams in *frames* (one tunnel), by stream id."""
    streams: dict[int, Stream] = {}
    for frame in frames:
        if frame.stream_id <= 0:
            continue  # settings (stream -1)
        st = streams.setdefault(frame.stream_id, Stream(frame.stream_id))
        if isinstance(frame, ClientToServer):
            st.client_frame(frame)
        else:
            st.server_frame(frame)
    return streams


def by_method(streams: dict[int, Stream]) -> dict[str, list[Stream]]:
    """The complete streams of each load method."""
    out: dict[str, list[Stream]] = {method: [] for method in LOAD}
    for st in streams.values():
        if st.complete:
            assert st.method in LOAD, st.method
            out[st.method].append(st)
    return out


# -- the reference's transcripts ----------------------------------------------------------


@dataclass
class Reference:
    """One official transcript: its carrying calls and its tunneled streams."""

    lines: int
    #: Full method of each carrying call, by call number.
    calls: dict[int, str]
    request_headers: dict[str, MetadataMap]
    #: Messages of calls that are not tunnel methods (only raw bytes are given).
    raw_messages: dict[str, list[bytes]]
    #: Carrying calls with a ``status`` line.
    finished: set[str]
    streams: dict[int, Stream]

    def methods(self) -> dict[str, list[Stream]]:
        return by_method(self.streams)

    def cut_off(self) -> list[Stream]:
        return [st for st in self.streams.values() if not st.complete]


def reference(direction: str) -> Reference:
    text = (VECTORS / f"{TRANSCRIPT[direction]}.jsonl").read_text()
    ref = Reference(0, {}, {}, {}, set(), {})
    frames: list[ClientToServer | ServerToClient] = []
    for line in text.splitlines():
        ref.lines += 1
        rec = json.loads(line)
        method = rec["method"]
        ref.calls[rec["call"]] = method
        if rec["kind"] == "request_headers":
            ref.request_headers[method] = rec["md"]
        elif rec["kind"] == "status":
            ref.finished.add(method)
        elif rec["kind"] == "message" and "frame" in rec:
            # The msg_type tells the frame's type whatever the carrying call
            # (for OpenReverseTunnel, c2s holds ServerToClient frames).
            frame_type = (
                ClientToServer if rec["msg_type"].endswith(".ClientToServer") else ServerToClient
            )
            frames.append(json_format.Parse(json.dumps(rec["frame"]), frame_type()))
        elif rec["kind"] == "message":
            ref.raw_messages.setdefault(method, []).append(base64.b64decode(rec["raw_b64"]))
    ref.streams = reassemble(frames)
    return ref


_references: dict[str, Reference] = {}


def cached_reference(direction: str) -> Reference:
    if direction not in _references:
        _references[direction] = reference(direction)
    return _references[direction]


def reference_stream(direction: str, method: str) -> Stream:
    """A complete stream of *method* (all of them are alike, see below)."""
    return cached_reference(direction).methods()[method][0]


def assert_like_reference_load(methods: dict[str, list[Stream]]) -> None:
    """What any complete stream of the load must look like, ours or the reference's."""
    for method, load in LOAD.items():
        assert methods[method], f"no complete {method} stream"
        for st in methods[method]:
            assert st.first_frame == "new_stream"
            assert st.initial_window_size == INITIAL_WINDOW
            assert st.protocol_revision == REVISION_ONE
            assert st.request_headers == {}
            assert [Message().parse(r) for r in st.requests] == [load.request] * load.requests
            assert st.requests == [bytes(load.request)] * load.requests
            assert len(st.responses) == load.responses
            assert st.status == (0, "", [])
            assert st.chunks and max(st.chunks) <= MAX_CHUNK


@pytest.mark.parametrize("direction", TRANSCRIPT)
def test_reference_load_is_ours(direction: str) -> None:
    """The reference's load sent exactly our ``_load`` requests, and got one answer each."""
    ref = cached_reference(direction)

    # The cut: no carrying call reached its status, and the only incomplete
    # streams are those still open at line 2,000. Each loop makes its calls one
    # after another, so that is at most the last stream of each method.
    assert ref.lines == TRUNCATED_AT
    assert ref.finished == set()
    assert not any(st.cancelled for st in ref.streams.values())
    cut = ref.cut_off()
    assert 0 < len(cut) <= MAX_CUT_OFF
    assert len({st.method for st in cut}) == len(cut)
    for st in cut:
        assert st.stream_id == max(
            other.stream_id for other in ref.streams.values() if other.method == st.method
        )

    methods = ref.methods()
    assert_like_reference_load(methods)
    # Every complete stream of a method was answered alike, so "the reference's
    # answer" is well defined (the test below compares ours with it).
    for streams in methods.values():
        first = streams[0]
        for st in streams[1:]:
            assert st.request_side() == first.request_side()
            assert st.answer() == first.answer()
    # Seen in the transcripts: plenty of each.
    assert min(len(streams) for streams in methods.values()) >= 4


def test_reference_trigger_is_ours() -> None:
    """The reverse transcript's TriggerTestRPCs is our method with our request."""
    ref = cached_reference("reverse")
    assert ref.calls == {1: TRIGGER, 2: OPEN_REVERSE_TUNNEL}
    assert TRIGGER in TunnelTester(TunnelServiceHandler()).__mapping__()

    [raw] = ref.raw_messages[TRIGGER]
    request = TriggerTestRpCsRequest().parse(raw)
    assert KEY.fullmatch(request.client_key)
    assert bytes(TriggerTestRpCsRequest(client_key=request.client_key)) == raw
    # The same key names the reverse tunnel the load goes over.
    assert ref.request_headers[OPEN_REVERSE_TUNNEL][CLIENT_KEY_HEADER] == [request.client_key]


# -- ours, recorded -----------------------------------------------------------------------


@pytest.fixture
def recorded(monkeypatch: pytest.MonkeyPatch) -> list[ClientToServer | ServerToClient]:
    """Every frame our protocol objects receive from here on, in order.

    Patch before any tunnel is made: a tunnel binds ``receive_frame`` when built.
    """
    frames: list[ClientToServer | ServerToClient] = []

    def wrap(cls: Any) -> None:
        original = cls.receive_frame

        def receive_frame(self: Any, frame: Any) -> Any:
            copy = type(frame)()
            copy.CopyFrom(frame)
            frames.append(copy)
            return original(self, frame)

        monkeypatch.setattr(cls, "receive_frame", receive_frame)

    wrap(TunnelClientProtocol)
    wrap(TunnelServerProtocol)
    return frames


@dataclass
class CarryingCall:
    method: str
    metadata: dict[str, str | bytes]


@pytest.mark.parametrize("direction", TRANSCRIPT)
async def test_our_programs_send_and_answer_like_the_reference(
    direction: str,
    recorded: list[ClientToServer | ServerToClient],
    start_server: StartServer,
    open_channel: OpenChannel,
) -> None:
    """Our client/server program code runs the load; its streams match the reference's."""
    # The server our tunnel.testing.server builds: the tunnel handler keyed by
    # test-client-key, and TunnelTestService (with a load of one round).
    handler = TunnelServiceHandler([TestService()], affinity_key=client_key)
    port = await start_server([handler, TunnelTester(handler, duration=0.0)])
    calls: list[CarryingCall] = []

    async def on_request(event: RecvRequest) -> None:
        calls.append(CarryingCall(event.method_name, dict(event.metadata)))

    listen(start_server.servers[-1], RecvRequest, on_request)
    channel = await open_channel(port)
    options = TunnelOptions()
    async with asyncio.timeout(RUN_TIMEOUT):
        if direction == "forward":
            assert await run_forward(channel, options, duration=0.0) >= len(LOAD)
        else:
            assert await run_reverse(channel, options) >= len(LOAD)

    ref = cached_reference(direction)
    # The same carrying calls, with the same protocol-relevant headers.
    assert sorted(c.method for c in calls) == sorted(ref.calls.values())
    for call in calls:
        their_headers = ref.request_headers[call.method]
        if call.method in (OPEN_TUNNEL, OPEN_REVERSE_TUNNEL):
            assert call.metadata.get(NEGOTIATE) == their_headers[NEGOTIATE][0] == "on"
        if call.method == OPEN_REVERSE_TUNNEL:
            key = call.metadata[CLIENT_KEY_HEADER]
            assert isinstance(key, str) and KEY.fullmatch(key)
            assert KEY.fullmatch(their_headers[CLIENT_KEY_HEADER][0])

    streams = reassemble(recorded)
    assert all(st.complete for st in streams.values())
    ours = by_method(streams)
    assert_like_reference_load(ours)
    for method, streams_of_method in ours.items():
        theirs = reference_stream(direction, method)
        for st in streams_of_method:
            assert st.request_side() == theirs.request_side(), method
            assert st.answer() == theirs.answer(), method


async def replay(channel: Any, method: str, requests: list[Message]) -> None:
    """Send *requests* as one call of *method*, half-close, read everything."""
    async with channel.request(method, LOAD[method].cardinality, Message, Message) as stream:
        for i, request in enumerate(requests):
            await stream.send_message(request, end=i == len(requests) - 1)
        async for _ in stream:
            pass


@pytest.mark.parametrize(
    ("mode", "direction"),
    [(FORWARD, "forward"), (REVERSE, "reverse")],
    indirect=["mode"],
    ids=["forward", "reverse"],
)
async def test_our_test_service_answers_reference_requests(
    direction: str,
    mode: Mode,
    recorded: list[ClientToServer | ServerToClient],
    server: int,
    open_channel: OpenChannel,
) -> None:
    """Sent the reference's own requests, our TestService answers as TestServer did."""
    channel = await open_channel(server, mode)
    async with asyncio.timeout(RUN_TIMEOUT):
        for method in LOAD:
            theirs = reference_stream(direction, method)
            await replay(channel, method, [Message().parse(r) for r in theirs.requests])

    streams = reassemble(recorded)
    ours = by_method(streams)
    assert sorted(st.method for st in streams.values()) == sorted(LOAD)
    for method, [st] in ours.items():
        theirs = reference_stream(direction, method)
        assert st.request_side()["requests"] == theirs.request_side()["requests"]
        assert st.request_headers == theirs.request_headers == {}
        assert st.answer() == theirs.answer(), method
