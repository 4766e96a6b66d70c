"""``max_concurrent_streams``: refused beyond it, unless the client knows it and waits.

The tunnel server announces its limit in the carrying call's headers; our
tunnel client keeps within it, so a call beyond it waits for room (bounded
by its own deadline) instead of being refused.  A client that does not know
the limit (the reference, or ours with the header taken away) gets
RESOURCE_EXHAUSTED for a stream beyond it, before any handler runs.
"""

from __future__ import annotations

import asyncio

import grpclib.events
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    CARDINALITY,
    TEST_TIMEOUT,
    Blocking,
    call_until_it_ends,
    options,
    probe_call,
    serving,
    tunnel_over,
)
from tests.reverse.support import connected, device_server, key_from_metadata, router
from tunnel._wire import MAX_STREAMS_HEADER
from tunnel.testing import Message

LIMIT = 3


@pytest.mark.parametrize("kind", ["forward", "reverse"])
async def test_client_that_knows_the_limit_waits_for_room(kind: str) -> None:
    blocking = Blocking()
    opts = options(max_concurrent_streams=LIMIT)
    if kind == "forward":
        handler = tunnel.TunnelServiceHandler([blocking.service()], options=opts)
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            serving([handler]) as served,
            tunnel_over(served.port) as channel,
        ):
            await _waits_for_room(channel, blocking)
    else:
        handler = tunnel.TunnelServiceHandler(affinity_key=key_from_metadata)
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            router(handler) as net,
            connected(net.port) as direct,
            device_server(direct, [blocking.service()], options=opts) as running,
        ):
            running.serve({"x-key": "dev"})
            pool = handler.key_as_channel("dev")
            await pool.wait_ready()
            (channel,) = handler.all_reverse_tunnels()
            await _waits_for_room(channel, blocking)


async def _waits_for_room(channel: tunnel.TunnelChannel, blocking: Blocking) -> None:
    calls = [asyncio.create_task(call_until_it_ends(channel, "Unary")) for _ in range(LIMIT + 4)]
    await blocking.started.wait(LIMIT)
    # The others wait on our side: no stream was even opened for them.
    assert channel._tunnel.core.active_streams == LIMIT == len(channel._tunnel.calls)
    assert not any(call.done() for call in calls)
    # A call that waits longer than its deadline times out, as any call would.
    with pytest.raises(asyncio.TimeoutError):
        async with probe_call(channel, "Unary", CARDINALITY["Unary"], timeout=0.2) as stream:
            await stream.send_message(Message(), end=True)
    # Room frees as calls end: cancel the running ones, the waiting ones start.
    for call in calls[:LIMIT]:
        call.cancel()
    await blocking.started.wait(2 * LIMIT)
    for call in calls:
        call.cancel()
    outcomes = await asyncio.gather(*calls, return_exceptions=True)
    assert not any(
        isinstance(o, GRPCError) and o.status is Status.RESOURCE_EXHAUSTED for o in outcomes
    )


async def test_stream_beyond_the_limit_is_refused_for_a_client_that_does_not_know() -> None:
    blocking = Blocking()
    handler = tunnel.TunnelServiceHandler(
        [blocking.service()], options=options(max_concurrent_streams=LIMIT)
    )
    async with asyncio.timeout(TEST_TIMEOUT), serving([handler]) as served:

        async def hide_limit(event: grpclib.events.SendInitialMetadata) -> None:
            del event.metadata[MAX_STREAMS_HEADER]

        grpclib.events.listen(served.server, grpclib.events.SendInitialMetadata, hide_limit)
        async with tunnel_over(served.port) as channel:
            assert channel._tunnel.peer_max_streams is None
            calls = [
                asyncio.create_task(call_until_it_ends(channel, "Unary")) for _ in range(LIMIT)
            ]
            await blocking.started.wait(LIMIT)
            refused = await call_until_it_ends(channel, "Unary")
            assert isinstance(refused, GRPCError), refused
            assert refused.status is Status.RESOURCE_EXHAUSTED
            assert "limit is 3" in (refused.message or "")
            assert blocking.started.count == LIMIT  # no handler ran for it
            calls[0].cancel()
            await blocking.cancelled.wait(1)
            # Room again: the next call is served.
            fourth = asyncio.create_task(call_until_it_ends(channel, "Unary"))
            await blocking.started.wait(LIMIT + 1)
            for call in (*calls, fourth):
                call.cancel()
            await asyncio.gather(*calls, fourth, return_exceptions=True)
