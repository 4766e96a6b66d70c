"""The grpctunnel-py (0.3.0, grpcio) side of the cross-implementation tests.

Runs in its own process: grpctunnel-py registers ``grpctunnel/v1/tunnel.proto``
in protobuf's default descriptor pool with other bytes than ours, and the pool
refuses a second file of the same name, so the two libraries cannot be
imported into one process. Everything here talks to our side over loopback.

Modes (``python tests/interop/grpctunnel_py_peer.py MODE --port N [--no-flow-control]``):

- ``server``: a grpcio server with grpctunnel-py's ``TunnelServiceHandler``:
  the test service (below) over forward tunnels, reverse tunnels keyed by the
  first ``test-client-key`` header, and ``TunnelTestService/TriggerTestRPCs``,
  which runs :data:`SCENARIOS` over the reverse tunnels of that key and prints
  the results as one JSON line on stdout. Prints ``listening`` when ready.
- ``client``: opens a forward tunnel to our server with grpctunnel-py, runs
  :data:`SCENARIOS` through it, prints the results as one JSON line.
- ``reverse-client --key K``: grpctunnel-py's ``ReverseTunnelServer`` serving
  the test service, with header ``test-client-key: K``; prints ``serving``
  once the tunnel is up and runs until stdin closes.

The test service implements the grpchantesting contract (shared/INTEROP.md)
with grpctunnel-py's handler API, as far as that API allows: it cannot send
error details (its status conversion keeps only code and message).

The scenarios' results are plain JSON (bytes as hex) that the test compares
with what the contract says.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
from google.protobuf import wrappers_pb2
from google.rpc import error_details_pb2, status_pb2

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from grpctunnel import (
    ReverseTunnelServer,
    TunnelServiceHandler,
    TunnelServiceHandlerOptions,
)
from grpctunnel.client import PendingChannel
from grpctunnel.options import TunnelOptions
from grpctunnel.proto.v1 import TunnelServiceStub, add_TunnelServiceServicer_to_server

from tests.stubs.pb.test_pb2 import Message

SERVICE = "grpchantesting.TestService"
KEY_HEADER = "test-client-key"


def _client_key(request: bytes) -> str:
    """The ``client_key`` of a serialized ``TriggerTestRPCsRequest``.

    There is no generated code for that message here, but its one field
    (``string client_key = 1``) has the wire form of ``StringValue``'s.
    """
    return wrappers_pb2.StringValue.FromString(request).value


# -- the test service, on grpctunnel-py's handler API ----------------------------------


def _echo(metadata: Any) -> dict[str, bytes]:
    """Request metadata as the contract's ``headers`` map: last value of each key."""
    result: dict[str, bytes] = {}
    for key, value in metadata or ():
        result[key] = value if isinstance(value, bytes) else value.encode()
    return result


def _md(values: Any) -> grpc.aio.Metadata:
    return grpc.aio.Metadata(
        *((k.lower(), v if k.lower().endswith("-bin") else v.decode()) for k, v in values.items())
    )


def _error(code: int) -> grpc.aio.AioRpcError:
    status = next((s for s in grpc.StatusCode if s.value[0] == code), grpc.StatusCode.UNKNOWN)
    return grpc.aio.AioRpcError(
        code=status,
        initial_metadata=grpc.aio.Metadata(),
        trailing_metadata=grpc.aio.Metadata(),
        details="error",
    )


async def _delay(request: Any) -> None:
    if request.delay_millis > 0:
        await asyncio.sleep(request.delay_millis / 1000)


async def _headers_and_trailers(stream: Any, context: Any, request: Any) -> None:
    if request.headers:
        await stream.set_response_headers(_md(request.headers))
    if request.trailers:
        await context.set_trailing_metadata(_md(request.trailers))


async def unary(request_bytes: bytes, context: Any) -> bytes:
    request = Message.FromString(request_bytes)
    await _delay(request)
    await _headers_and_trailers(context._stream, context, request)
    if request.code:
        raise _error(request.code)
    reply = Message(payload=request.payload, headers=_echo(context.invocation_metadata()))
    return reply.SerializeToString()


async def client_stream(stream: Any, context: Any) -> bytes:
    last, count = Message(), 0
    while True:
        try:
            last = await stream.recv_message(Message.FromString)
        except StopAsyncIteration:
            break
        count += 1
        if last.code:
            break
    await _delay(last)
    await _headers_and_trailers(stream, context, last)
    if last.code:
        raise _error(last.code)
    reply = Message(payload=last.payload, count=count, headers=_echo(context.invocation_metadata()))
    return reply.SerializeToString()


async def server_stream(request_bytes: bytes, stream: Any, context: Any) -> None:
    request = Message.FromString(request_bytes)
    await _delay(request)
    if request.headers:
        await stream.set_response_headers(_md(request.headers))
    echoed = _echo(context.invocation_metadata())
    for _ in range(request.count):
        await stream.send_message(Message(payload=request.payload, headers=echoed))
    if request.trailers:
        await context.set_trailing_metadata(_md(request.trailers))
    if request.code:
        raise _error(request.code)


async def bidi_stream(stream: Any, context: Any) -> None:
    echoed = _echo(context.invocation_metadata())
    last, count, half_duplex, buffered = None, 0, False, []
    while True:
        try:
            request = await stream.recv_message(Message.FromString)
        except StopAsyncIteration:
            break
        last = request
        await _delay(request)
        if count == 0:
            if request.headers:
                await stream.set_response_headers(_md(request.headers))
            half_duplex = request.count < 0
        count += 1
        if request.code:
            break
        reply = Message(payload=request.payload, count=count, headers=echoed)
        if half_duplex:
            buffered.append(reply)
        else:
            await stream.send_message(reply)
    for reply in buffered:
        await stream.send_message(reply)
    if last is not None and last.trailers:
        await context.set_trailing_metadata(_md(last.trailers))
    if last is not None and last.code:
        raise _error(last.code)


async def use_external_message_twice(request_bytes: bytes, context: Any) -> bytes:
    return b""  # google.protobuf.Empty


def register_test_service(target: Any) -> None:
    target.register_method(f"{SERVICE}/UseExternalMessageTwice", use_external_message_twice)
    target.register_method(f"{SERVICE}/Unary", unary)
    target.register_method(f"{SERVICE}/ClientStream", client_stream, is_client_stream=True)
    target.register_method(f"{SERVICE}/ServerStream", server_stream, is_server_stream=True)
    target.register_method(
        f"{SERVICE}/BidiStream", bidi_stream, is_client_stream=True, is_server_stream=True
    )


# -- scenarios: calls made through a grpctunnel-py channel -----------------------------

REQUEST_METADATA = (
    ("x-req-single", "alpha"),
    ("x-req-multi", "one"),
    ("x-req-multi", "two"),
    ("x-req-data-bin", b"\x00\x01\x02\x03"),
)


def _app_md(metadata: Any) -> list[list[str]]:
    """Application metadata as sorted [key, hex value] pairs."""
    pairs = []
    for key, value in metadata or ():
        if key.startswith("x-"):
            pairs.append([key, (value if isinstance(value, bytes) else value.encode()).hex()])
    return sorted(pairs)


def _reply(message: Any) -> dict[str, Any]:
    return {
        "payload": message.payload.hex(),
        "count": message.count,
        "headers": sorted([k, v.hex()] for k, v in message.headers.items() if k.startswith("x-")),
    }


def _failure(exc: grpc.aio.AioRpcError) -> dict[str, Any]:
    details: list[str] = []
    for key, value in exc.trailing_metadata() or ():
        if key == "grpc-status-details-bin" and isinstance(value, bytes):
            status = status_pb2.Status.FromString(value)
            details = [d.type_url for d in status.details]
    return {
        "code": exc.code().value[0],
        "message": exc.details(),
        "trailers": _app_md(exc.trailing_metadata()),
        "details": details,
    }


def _method(channel: Any, kind: str, name: str) -> Any:
    return getattr(channel, kind)(
        f"/{SERVICE}/{name}",
        request_serializer=Message.SerializeToString,
        response_deserializer=Message.FromString,
    )


async def s_unary_metadata(channel: Any) -> Any:
    reply = await _method(channel, "unary_unary", "Unary")(
        Message(payload=b"hello, tunnel"), metadata=grpc.aio.Metadata(*REQUEST_METADATA)
    )
    return _reply(reply)


async def s_unary_error(channel: Any) -> Any:
    info = error_details_pb2.ErrorInfo(reason="TEST_REASON", domain="grpctunnel.test")
    request = Message(payload=b"please fail", code=9, trailers={"x-err-trailer": b"err-tlr-val"})
    request.error_details.add().Pack(info)
    request.error_details.add().Pack(wrappers_pb2.StringValue(value="second detail"))
    try:
        await _method(channel, "unary_unary", "Unary")(request)
    except grpc.aio.AioRpcError as exc:
        return _failure(exc)
    return "no error"


async def s_client_stream(channel: Any) -> Any:
    async def requests() -> Any:
        for i in range(5):
            yield Message(payload=f"cs-{i}".encode())

    return _reply(await _method(channel, "stream_unary", "ClientStream")(requests()))


async def s_server_stream(channel: Any) -> Any:
    replies = await _method(channel, "unary_stream", "ServerStream")(
        Message(payload=b"ss", count=5)
    )
    return [_reply(r) async for r in replies]


async def s_server_stream_error(channel: Any) -> Any:
    replies = await _method(channel, "unary_stream", "ServerStream")(
        Message(payload=b"ss", count=2, code=5)
    )
    received = []
    try:
        async for reply in replies:
            received.append(_reply(reply))
    except grpc.aio.AioRpcError as exc:
        return {"replies": received, **_failure(exc)}
    return {"replies": received, "error": "none"}


async def s_bidi(channel: Any) -> Any:
    call = await _method(channel, "stream_stream", "BidiStream")()
    replies = []
    for i in range(5):
        await call.write(Message(payload=f"bidi-{i}".encode()))
        replies.append(_reply(await call.read()))
    await call.done_writing()
    end = await call.read()
    return {"replies": replies, "end": end is None}


async def s_large_unary(channel: Any) -> Any:
    payload = bytes(i % 256 for i in range(100_000))
    reply = await _method(channel, "unary_unary", "Unary")(Message(payload=payload))
    return {"size": len(reply.payload), "same": reply.payload == payload}


SCENARIOS: dict[str, Callable[[Any], Awaitable[Any]]] = {
    "unary_metadata": s_unary_metadata,
    "unary_error": s_unary_error,
    "client_stream": s_client_stream,
    "server_stream": s_server_stream,
    "server_stream_error": s_server_stream_error,
    "bidi": s_bidi,
    "large_unary": s_large_unary,
}


async def run_scenarios(channel: Any) -> dict[str, Any]:
    results: dict[str, Any] = {}
    for name, scenario in SCENARIOS.items():
        try:
            results[name] = await asyncio.wait_for(scenario(channel), 10)
        except TimeoutError:
            results[name] = {"exception": "timeout"}
        except Exception as exc:
            results[name] = {"exception": f"{type(exc).__name__}: {exc}"}
    return results


def emit(line: str) -> None:
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


# -- modes ---------------------------------------------------------------------------


async def mode_server(port: int, options: TunnelOptions) -> None:
    def affinity(channel: Any) -> str:
        for key, value in channel._adapter.invocation_metadata() or ():
            if key == KEY_HEADER:
                return str(value)
        return ""

    handler = TunnelServiceHandler(
        TunnelServiceHandlerOptions(
            affinity_key=affinity, disable_flow_control=options.disable_flow_control
        )
    )
    register_test_service(handler)

    async def trigger(request_bytes: bytes, context: Any) -> bytes:
        key = _client_key(request_bytes)
        channel = handler.key_as_channel(key)
        if not await channel.wait_for_ready(1.0):
            await context.abort(grpc.StatusCode.DEADLINE_EXCEEDED, "no reverse tunnel")
        emit(json.dumps({"key": key, "results": await run_scenarios(channel)}))
        return b""

    server = grpc.aio.server()
    add_TunnelServiceServicer_to_server(handler.service(), server)
    server.add_generic_rpc_handlers(
        [
            grpc.method_handlers_generic_handler(
                "TunnelTestService",
                {
                    "TriggerTestRPCs": grpc.unary_unary_rpc_method_handler(
                        trigger,
                        request_deserializer=lambda b: b,
                        response_serializer=lambda b: b,
                    )
                },
            )
        ]
    )
    server.add_insecure_port(f"127.0.0.1:{port}")
    await server.start()
    emit("listening")
    await server.wait_for_termination()


async def mode_client(port: int, options: TunnelOptions) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        tunnel = await PendingChannel(TunnelServiceStub(channel), options).start()
        try:
            emit(json.dumps({"results": await run_scenarios(tunnel)}))
        finally:
            await tunnel.close_async()


async def mode_reverse_client(port: int, options: TunnelOptions, key: str) -> None:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        server = ReverseTunnelServer(TunnelServiceStub(channel), options)
        register_test_service(server)
        serving = asyncio.create_task(server.serve(metadata=grpc.aio.Metadata((KEY_HEADER, key))))
        emit("serving")
        loop = asyncio.get_running_loop()
        stdin_closed = loop.run_in_executor(None, sys.stdin.read)
        await asyncio.wait([serving, stdin_closed], return_when=asyncio.FIRST_COMPLETED)
        await server.stop()
        if serving.done():
            started, error = serving.result()
            emit(json.dumps({"started": started, "error": str(error) if error else None}))


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["server", "client", "reverse-client"])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--no-flow-control", action="store_true")
    parser.add_argument("--key", default="")
    args = parser.parse_args()
    options = TunnelOptions(disable_flow_control=args.no_flow_control)
    if args.mode == "server":
        asyncio.run(mode_server(args.port, options))
    elif args.mode == "client":
        asyncio.run(mode_client(args.port, options))
    else:
        asyncio.run(mode_reverse_client(args.port, options, args.key))


if __name__ == "__main__":
    main()
