"""Tunnels inside tunnels: a forward tunnel opened over a ``TunnelChannel``.

The server of each tunnel serves a ``TunnelServiceHandler`` inside it, so the
next tunnel's ``OpenTunnel`` call is itself a tunneled call.  Every kind of
call must work through the innermost tunnel, exactly as it does directly.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

import grpclib.client
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.integration.support import (
    FLOW_CONTROL,
    TEST_TIMEOUT,
    all_kinds,
    fc_id,
    options,
    serving,
    tunnel_over,
)
from tunnel.testing import TestService
from tunnel.testing.conformance import run_conformance, verify_conformance


def nested_handler(depth: int, opts: tunnel.TunnelOptions) -> tunnel.TunnelServiceHandler:
    """A handler serving TestService and, below *depth*, the next level's handler."""
    services: list[Any] = [TestService()]
    if depth > 1:
        services.append(nested_handler(depth - 1, opts))
    return tunnel.TunnelServiceHandler(services, options=opts)


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
@pytest.mark.parametrize("depth", [2, 3])
async def test_every_call_kind_through_nested_tunnels(depth: int, disable_fc: bool) -> None:
    opts = options(disable_flow_control=disable_fc)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([nested_handler(depth, opts)]) as served,
        contextlib.AsyncExitStack() as stack,
    ):
        channel = await stack.enter_async_context(tunnel_over(served.port, opts=opts))
        for _ in range(depth - 1):
            channel = await stack.enter_async_context(tunnel.open_tunnel(channel, options=opts))
        # Each level a distinct tunnel over the one before it.
        assert isinstance(channel, tunnel.TunnelChannel)
        await all_kinds(channel)
        # Several at once, so that frames of different inner streams
        # interleave inside each outer one.
        await asyncio.gather(*(all_kinds(channel, bytes([i])) for i in range(5)))


@pytest.mark.parametrize("disable_fc", FLOW_CONTROL, ids=fc_id)
async def test_conformance_through_two_levels(disable_fc: bool) -> None:
    opts = options(disable_flow_control=disable_fc)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([nested_handler(2, opts)]) as served,
        tunnel_over(served.port, opts=opts) as outer,
        tunnel.open_tunnel(outer, options=opts) as inner,
    ):
        verify_conformance(await run_conformance(inner))
        # The outer tunnel still serves calls of its own beside the inner one.
        await all_kinds(outer)
        assert outer.error is None and inner.error is None


async def test_closing_the_outer_tunnel_ends_the_inner_one() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        serving([nested_handler(2, options())]) as served,
        tunnel_over(served.port) as outer,
    ):
        inner = await tunnel.open_tunnel(outer)
        try:
            await all_kinds(inner)
            outer.close()
            async with asyncio.timeout(5):
                await inner.wait_closed()
            assert inner.closed
        finally:
            await inner.aclose()


async def test_errors_through_ten_levels_keep_the_innermost_message() -> None:
    """The connection under ten tunnels is lost: the innermost call's message
    names the cause once, instead of growing a prefix (and a repr) per level."""
    depth = 10
    async with asyncio.timeout(TEST_TIMEOUT), serving([nested_handler(depth, options())]) as served:
        direct = grpclib.client.Channel("127.0.0.1", served.port)
        try:
            async with contextlib.AsyncExitStack() as stack:
                channel: grpclib.client.Channel = direct
                for _ in range(depth):
                    channel = await stack.enter_async_context(tunnel.open_tunnel(channel))
                await all_kinds(channel)
                direct.close()
                with pytest.raises(GRPCError) as exc_info:
                    await all_kinds(channel)
                error = exc_info.value
                assert error.status is Status.UNAVAILABLE
                assert error.message is not None
                assert error.message.count("tunnel closed") == 1, error.message
                assert len(error.message) < 100, error.message
        finally:
            direct.close()
