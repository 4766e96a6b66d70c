"""Each part of a tunnel failing, one at a time: the whole tunnel ends, and says why.

Over an in-memory carrier (see ``memory.py``): a send that fails, a receive
that fails, a peer that stops answering.  Whichever part fails, on either
end, every call ends with a status, the handlers are cancelled, and
``serve()`` / ``wait_closed()`` return; nothing waits forever.
"""

from __future__ import annotations

import asyncio

import grpclib.server
import pytest
from grpclib.const import Cardinality, Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.adapter.memory import Broken, tunnel_pair
from tests.integration.support import Blocking, Latch, Probe, call_until_it_ends
from tunnel.testing._pb.grpchantesting import Message

BOUND = 5.0


class Sender:
    """A server-streaming handler that sends 200 kB and records how it ended."""

    def __init__(self) -> None:
        self.started = Latch()
        self.cancelled = Latch()

    async def send(self, stream: grpclib.server.Stream[Message, Message]) -> None:
        self.started.hit()
        await stream.recv_message()
        try:
            for _ in range(20):
                await stream.send_message(Message(payload=b"\x07" * 10_000))
        except asyncio.CancelledError:
            self.cancelled.hit()
            raise

    def service(self) -> Probe:
        return Probe(ServerStream=(Cardinality.UNARY_STREAM, self.send))


async def test_server_writer_failure_ends_the_tunnel() -> None:
    """A handler blocked sending 200 kB is released and ``serve()`` returns."""
    sender = Sender()
    async with tunnel_pair([sender.service()]) as pair:
        pair.server_carrier.fail_send_after = 3
        call = asyncio.create_task(call_until_it_ends(pair.channel, "ServerStream"))
        async with asyncio.timeout(BOUND):
            await sender.started.wait(1)
            await sender.cancelled.wait(1)
            with pytest.raises(tunnel.TunnelClosedError) as exc_info:
                await pair.serving
        assert isinstance(exc_info.value.__cause__, Broken)
        assert pair.server.closed
        assert pair.server.error is exc_info.value
        pair.client.close()
        async with asyncio.timeout(BOUND):
            await call


async def test_server_reader_failure_ends_the_tunnel() -> None:
    blocking = Blocking()
    async with tunnel_pair([blocking.service()]) as pair:
        call = asyncio.create_task(call_until_it_ends(pair.channel, "BidiStream"))
        async with asyncio.timeout(BOUND):
            await blocking.started.wait(1)
        pair.server_carrier.fail_recv.set()
        async with asyncio.timeout(BOUND):
            await blocking.cancelled.wait(1)
            with pytest.raises(tunnel.TunnelClosedError) as exc_info:
                await pair.serving
        assert isinstance(exc_info.value.__cause__, Broken)
        pair.client.close()
        async with asyncio.timeout(BOUND):
            await call


@pytest.mark.parametrize("part", ["writer", "reader"])
async def test_client_failure_fails_every_call(part: str) -> None:
    blocking = Blocking()
    async with tunnel_pair([blocking.service()]) as pair:
        calls = [
            asyncio.create_task(call_until_it_ends(pair.channel, kind)) for kind in Blocking.KINDS
        ]
        async with asyncio.timeout(BOUND):
            await blocking.started.wait(len(calls))
        if part == "writer":
            pair.client_carrier.fail_send_after = pair.client_carrier.sent
            # One more call: its frames are what the writer fails to write.
            calls.append(asyncio.create_task(call_until_it_ends(pair.channel, "Unary")))
        else:
            pair.client_carrier.fail_recv.set()
        async with asyncio.timeout(BOUND):
            outcomes = await asyncio.gather(*calls)
            await pair.client.wait_closed()
        for outcome in outcomes:
            assert isinstance(outcome, GRPCError), outcome
            assert outcome.status is Status.UNAVAILABLE
            assert "send failed" in (outcome.message or "") or "recv failed" in (
                outcome.message or ""
            )
        assert isinstance(pair.client.error, tunnel.TunnelClosedError)
        assert isinstance(pair.client.error.__cause__, Broken)
        # A new call fails at once.
        async with asyncio.timeout(BOUND):
            retry = await call_until_it_ends(pair.channel, "Unary")
        assert isinstance(retry, GRPCError) and retry.status is Status.UNAVAILABLE


async def test_silent_server_fails_the_client_by_keepalive() -> None:
    blocking = Blocking()
    opts = tunnel.TunnelOptions(keepalive_interval=0.1, keepalive_timeout=0.2)
    async with tunnel_pair([blocking.service()], opts) as pair:
        call = asyncio.create_task(call_until_it_ends(pair.channel, "Unary"))
        async with asyncio.timeout(BOUND):
            await blocking.started.wait(1)
        pair.server_carrier.mute = True
        async with asyncio.timeout(BOUND):
            outcome = await call
        assert isinstance(outcome, GRPCError) and outcome.status is Status.UNAVAILABLE
        assert isinstance(pair.client.error, tunnel.KeepaliveTimeoutError)
        async with asyncio.timeout(BOUND):
            await pair.client.wait_closed()
        assert pair.client_carrier.aborted  # the connection under it is cut
