"""Mutual TLS on the carrying connection; handlers see the opener's certificate."""

from __future__ import annotations

import asyncio
import ssl
from typing import Any

import grpclib.server
import pytest
import trustme
from grpclib.const import Cardinality
from grpclib.exceptions import StreamTerminatedError

import tunnel
from tests.integration.support import (
    TEST_TIMEOUT,
    Probe,
    all_kinds,
    probe_call,
    serving,
    tunnel_over,
)
from tunnel.testing import TestService
from tunnel.testing._pb.grpchantesting import Message


def common_name(cert: dict[str, Any] | None) -> str | None:
    if not cert:
        return None
    for rdn in cert.get("subject", ()):
        for key, value in rdn:
            if key == "commonName":
                return str(value)
    return None


@pytest.fixture(scope="module")
def ca() -> trustme.CA:
    return trustme.CA()


def server_context(ca: trustme.CA) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1", "localhost").configure_cert(ctx)
    ca.configure_trust(ctx)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.set_alpn_protocols(["h2"])
    return ctx


def client_context(ca: trustme.CA, name: str | None) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    ca.configure_trust(ctx)
    if name is not None:
        ca.issue_cert(f"{name}.example.org", common_name=name).configure_cert(ctx)
    ctx.set_alpn_protocols(["h2"])
    return ctx


async def test_handler_reads_the_openers_client_certificate(ca: trustme.CA) -> None:
    seen: list[tuple[str | None, str | None]] = []

    async def whoami(stream: grpclib.server.Stream[Message, Message]) -> None:
        await stream.recv_message()
        info = tunnel.current_tunnel()
        assert info is not None and info.peer is not None and stream.peer is not None
        from_stream = common_name(stream.peer.cert())
        seen.append((from_stream, common_name(info.peer.cert())))
        await stream.send_message(Message(payload=(from_stream or "").encode()))

    probe = Probe(WhoAmI=(Cardinality.UNARY_UNARY, whoami))
    handler = tunnel.TunnelServiceHandler([probe, TestService()])
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler], ssl_context=server_context(ca)) as served,
        tunnel_over(served.port, ssl_context=client_context(ca, "device-42")) as channel,
    ):
        async with probe_call(channel, "WhoAmI", Cardinality.UNARY_UNARY) as stream:
            await stream.send_message(Message(), end=True)
            reply = await stream.recv_message()
        assert reply is not None and reply.payload == b"device-42"
        assert seen == [("device-42", "device-42")]
        # The client side sees the server's certificate on its peer.
        assert channel.peer is not None and channel.peer.cert()
        await all_kinds(channel)


async def test_client_without_certificate_is_refused(ca: trustme.CA) -> None:
    handler = tunnel.TunnelServiceHandler([TestService()])
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([handler], ssl_context=server_context(ca)) as served,
    ):
        # With TLS 1.3 the client's handshake completes before the server
        # checks for a certificate, so grpclib sees the connection drop.
        with pytest.raises((ssl.SSLError, OSError, StreamTerminatedError)):
            async with tunnel_over(served.port, ssl_context=client_context(ca, None)):
                pass
