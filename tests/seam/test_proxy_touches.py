"""What ``tunnel._seam`` assumes of grpclib's internals, checked against grpclib itself.

Each test names the seam function whose assumption it checks, and fails by
that name if a grpclib release changes it.  They run real grpclib servers
and channels on 127.0.0.1, with nothing of this package in between.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import grpclib.client
import grpclib.server
import pytest
from google.rpc import error_details_pb2, status_pb2
from grpclib.const import Cardinality, Handler, Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from tests.proxy.support import Stack
from tunnel import _seam
from tunnel.raw import RawMessage, RawStatusDetails, RawStatusDetailsCodec

TIMEOUT = 10.0


class _Handlers:
    """Raw handlers, one per assumption."""

    def __init__(self) -> None:
        self.details = b""

    async def echo(self, stream: grpclib.server.Stream[RawMessage, RawMessage]) -> None:
        async for message in stream:
            await stream.send_message(message)

    async def fail_with_raw_details(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.recv_message()
        _seam.use_status_details_codec(stream, RawStatusDetailsCodec())
        await stream.send_trailing_metadata(
            status=Status.NOT_FOUND,
            status_message="gone",
            status_details=RawStatusDetails(self.details),
        )

    async def fail_while_client_sends(self, stream: grpclib.server.Stream[Any, Any]) -> None:
        await stream.recv_message()
        await stream.send_trailing_metadata(
            status=Status.ABORTED, status_message="stop", metadata={"why-bin": b"\x00\x01"}
        )

    def __mapping__(self) -> dict[str, Handler]:
        bidi = Cardinality.STREAM_STREAM
        return {
            "/seam.Test/FailWithRawDetails": Handler(
                self.fail_with_raw_details, bidi, RawMessage, RawMessage
            ),
            "/seam.Test/FailWhileClientSends": Handler(
                self.fail_while_client_sends, bidi, RawMessage, RawMessage
            ),
        }


@contextlib.asynccontextmanager
async def served(server: grpclib.server.Server) -> AsyncIterator[grpclib.client.Channel]:
    """A channel to ``server``, started on 127.0.0.1; both closed on exit."""
    async with contextlib.AsyncExitStack() as exits:
        stack = Stack(exits)
        yield stack.channel(await stack.start(server))


async def test_replace_server_mapping_every_lookup_goes_through_get() -> None:
    handlers = _Handlers()
    server = grpclib.server.Server([handlers])
    assert type(server._mapping) is dict
    assert set(server._mapping) == set(handlers.__mapping__())
    looked_up: list[str] = []

    class Table(dict[str, Handler]):
        def get(self, name: str, default: Any = None) -> Any:
            looked_up.append(name)
            found = super().get(name)
            if found is None:
                return Handler(handlers.echo, Cardinality.STREAM_STREAM, RawMessage, RawMessage)
            return found

    _seam.replace_server_mapping(server, Table)
    async with (
        served(server) as channel,
        asyncio.timeout(TIMEOUT),
        channel.request(
            "/not.Registered/Anywhere", Cardinality.UNARY_UNARY, RawMessage, RawMessage
        ) as call,
    ):
        await call.send_message(RawMessage(b"hello"), end=True)
        assert await call.recv_message() == RawMessage(b"hello")
    assert looked_up == ["/not.Registered/Anywhere"]


async def test_replace_server_mapping_is_refused_once_the_server_started() -> None:
    server = grpclib.server.Server([])
    assert server._server is None
    async with served(server):
        assert server._server is not None
        with pytest.raises(RuntimeError, match="before the server starts"):
            _seam.replace_server_mapping(server, dict)


async def test_use_status_details_codec_applies_to_one_call_each_side() -> None:
    handlers = _Handlers()
    # A detail type nobody in this process knows: only its bytes can survive.
    status = status_pb2.Status(code=Status.NOT_FOUND.value, message="gone")
    status.details.add(type_url="type.googleapis.com/nowhere.Known", value=b"\x08\x2a")
    status.details.add().Pack(error_details_pb2.ErrorInfo(reason="R"))
    handlers.details = status.SerializeToString()
    async with served(grpclib.server.Server([handlers])) as channel, asyncio.timeout(TIMEOUT):
        name = "/seam.Test/FailWithRawDetails"
        stream: grpclib.client.Stream[RawMessage, RawMessage]
        async with channel.request(name, Cardinality.UNARY_UNARY, RawMessage, RawMessage) as stream:
            assert hasattr(stream, "_status_details_codec")
            _seam.use_status_details_codec(stream, RawStatusDetailsCodec())
            await stream.send_message(RawMessage(), end=True)
            with pytest.raises(GRPCError) as raw:
                await stream.recv_message()
        assert raw.value.details == RawStatusDetails(handlers.details)
        # The channel's own codec is untouched: the next call decodes as usual.
        with pytest.raises(GRPCError) as decoded:
            async with channel.request(name, Cardinality.UNARY_UNARY, RawMessage, RawMessage) as s:
                await s.send_message(RawMessage(), end=True)
                await s.recv_message()
        assert repr(decoded.value.details[0]) == "Unknown('nowhere.Known')"
        assert decoded.value.details[1] == error_details_pb2.ErrorInfo(reason="R")


async def test_received_status_headers_after_the_server_reset_the_call() -> None:
    async with served(grpclib.server.Server([_Handlers()])) as channel, asyncio.timeout(TIMEOUT):
        stream = channel.request(
            "/seam.Test/FailWhileClientSends", Cardinality.STREAM_STREAM, RawMessage, RawMessage
        )
        assert _seam.received_status_headers(stream) is None  # nothing sent yet
        with pytest.raises(GRPCError) as failed:
            async with stream:
                await stream.send_message(RawMessage(b"one"))  # and never end()
                # The reset makes this raise StreamTerminatedError, which
                # grpclib's exit turns into the status; should the reset come
                # after the end of the messages, the same exit does the same.
                while await stream.recv_message() is not None:
                    pass
                raise StreamTerminatedError("the messages ended before the reset")
        assert failed.value.status is Status.ABORTED
        # What grpclib's public API lost (the trailers) is still there.
        headers = _seam.received_status_headers(stream)
        assert headers is not None
        assert ("grpc-status", str(Status.ABORTED.value)) in headers
        assert ("why-bin", "AAE") in headers  # base64 of b"\x00\x01", unpadded
