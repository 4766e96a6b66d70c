"""``serve_forever``'s policy: what it retries, what it gives up on, what it says.

Refusals that will not go away (UNIMPLEMENTED, UNAUTHENTICATED,
PERMISSION_DENIED by default) are raised after a few attempts instead of
being retried forever; every connection is logged at INFO with the attempts
and downtime it took; connected/disconnected callbacks (plain or async) fire;
the metadata of each attempt may come from a callable, so a short-lived
token is fetched anew; callbacks that raise are logged, never lost.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import grpclib.events
import pytest
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.reverse.support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Device,
    LogWatch,
    connected,
    device_server,
    key_from_metadata,
    registered,
    router,
    who,
)

BACKOFF: dict[str, Any] = {"min_backoff": 0.01, "max_backoff": 0.05, "jitter": 0.2}


class Gate:
    """A ``RecvRequest`` listener: refuses ``OpenReverseTunnel`` while ``refusal`` is set,
    and records the ``authorization`` header of each attempt."""

    def __init__(self, refusal: Status | None) -> None:
        self.refusal = refusal
        self.tokens: list[str] = []

    async def __call__(self, event: grpclib.events.RecvRequest) -> None:
        if not event.method_name.endswith("/OpenReverseTunnel"):
            return
        self.tokens.append(str(event.metadata.get("authorization")))
        if self.refusal is not None:
            raise GRPCError(self.refusal, "refused by the gate")


@pytest.mark.parametrize(
    "refusal", [Status.UNIMPLEMENTED, Status.UNAUTHENTICATED, Status.PERMISSION_DENIED]
)
async def test_permanent_refusal_is_raised_after_three_attempts(
    refusal: Status, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunnel")
    gate = Gate(refusal)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(listeners=[(grpclib.events.RecvRequest, gate)]) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        with pytest.raises(GRPCError) as exc_info:
            async with asyncio.timeout(PROMPT):
                await running.server.serve_forever({KEY_HEADER: "dev"}, **BACKOFF)
        assert exc_info.value.status is refusal
        assert len(gate.tokens) == 3
        giving_up = [r for r in caplog.records if "giving up" in r.getMessage()]
        assert len(giving_up) == 1 and giving_up[0].levelno == logging.ERROR


async def test_which_statuses_are_permanent_is_configurable() -> None:
    gate = Gate(Status.UNAUTHENTICATED)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(listeners=[(grpclib.events.RecvRequest, gate)]) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        with LogWatch("reconnecting in") as retries:
            forever = asyncio.create_task(
                running.server.serve_forever(
                    {KEY_HEADER: "dev"}, permanent_statuses={Status.PERMISSION_DENIED}, **BACKOFF
                )
            )
            running.tasks.append(forever)
            async with asyncio.timeout(PROMPT):
                await retries.wait(5)  # retried, not raised
            assert not forever.done()
            # A refusal that is permanent ends it, however many came before.
            gate.refusal = Status.PERMISSION_DENIED
            with pytest.raises(GRPCError) as exc_info:
                async with asyncio.timeout(PROMPT):
                    await forever
            assert exc_info.value.status is Status.PERMISSION_DENIED


async def test_transient_failures_in_between_reset_the_count() -> None:
    gate = Gate(Status.UNAUTHENTICATED)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(listeners=[(grpclib.events.RecvRequest, gate)]) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        attempts = 0

        def metadata() -> dict[str, str]:
            nonlocal attempts
            attempts += 1
            # Every other attempt meets a transient failure instead.
            gate.refusal = Status.UNAUTHENTICATED if attempts % 2 else Status.UNAVAILABLE
            return {KEY_HEADER: "dev"}

        with LogWatch("reconnecting in") as retries:
            forever = asyncio.create_task(running.server.serve_forever(metadata, **BACKOFF))
            running.tasks.append(forever)
            async with asyncio.timeout(PROMPT):
                await retries.wait(8)
            assert not forever.done()


async def test_connections_are_logged_with_attempts_and_downtime(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="tunnel")
    async with asyncio.timeout(TEST_TIMEOUT):
        async with router() as gone:
            port = gone.port
        async with (
            connected(port) as channel,
            device_server(channel, [Device("dev")]) as running,
        ):
            with LogWatch("reconnecting in") as retries:
                forever = asyncio.create_task(
                    running.server.serve_forever({KEY_HEADER: "dev"}, **BACKOFF)
                )
                running.tasks.append(forever)
                await retries.wait(2)  # nobody listens yet
            async with router(port=port) as back:
                await registered(back.handler, "dev", forever)
                connects = [r for r in caplog.records if "connected after" in r.getMessage()]
                assert len(connects) == 1, caplog.text
                assert connects[0].levelno == logging.INFO
                message = connects[0].getMessage()
                attempts = int(message.split("connected after ")[1].split()[0])
                assert attempts >= 3
                assert "s without a tunnel" in message


async def test_callbacks_plain_and_async_and_failing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tunnel")
    events: list[str] = []
    changed = asyncio.Event()

    async def on_connected() -> None:
        await asyncio.sleep(0)
        events.append("connected")
        changed.set()

    def on_disconnected(reason: str) -> None:
        events.append(f"disconnected: {reason}")
        changed.set()
        raise RuntimeError("a bug in the application's callback")

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        forever = asyncio.create_task(
            running.server.serve_forever(
                {KEY_HEADER: "dev"},
                on_connected=on_connected,
                on_disconnected=on_disconnected,
                **BACKOFF,
            )
        )
        running.tasks.append(forever)
        for round_ in range(2):
            await registered(net.handler, "dev", forever)
            while len(events) < 2 * round_ + 1:
                changed.clear()
                await changed.wait()
            (reverse,) = net.handler.all_reverse_tunnels()
            await reverse.aclose()
            while len(events) < 2 * round_ + 2:
                changed.clear()
                await changed.wait()
        assert events[0] == "connected" and events[2] == "connected"
        assert events[1].startswith("disconnected: ")
        # The failing callback was logged each time, and serve_forever went on.
        failures = [r for r in caplog.records if "on_disconnected" in r.getMessage()]
        assert len(failures) == 2 and failures[0].exc_info is not None
        assert not forever.done()


async def test_metadata_callable_is_called_for_every_attempt() -> None:
    gate = Gate(None)
    issued = 0

    async def fresh_token() -> dict[str, str]:
        nonlocal issued
        issued += 1
        return {KEY_HEADER: "dev", "authorization": f"Bearer token-{issued}"}

    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(listeners=[(grpclib.events.RecvRequest, gate)]) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        forever = asyncio.create_task(running.server.serve_forever(fresh_token, **BACKOFF))
        running.tasks.append(forever)
        for _ in range(3):
            await registered(net.handler, "dev", forever)
            assert await who(net.handler.key_as_channel("dev")) == "dev"
            (reverse,) = net.handler.all_reverse_tunnels()
            await reverse.aclose()
        await registered(net.handler, "dev", forever)
        assert gate.tokens == [f"Bearer token-{i}" for i in range(1, 5)]


def test_callbacks_that_cannot_be_called_are_refused_where_given() -> None:
    # Each callback here is not callable: bad input on purpose.
    with pytest.raises(TypeError, match="on_reverse_tunnel_open"):
        tunnel.TunnelServiceHandler(on_reverse_tunnel_open="not a function")  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="affinity_key"):
        tunnel.TunnelServiceHandler(affinity_key=42)  # type: ignore[arg-type]
    with pytest.raises(TypeError, match="on_tunnel_open"):
        tunnel.ReconnectingTunnelChannel(object(), on_tunnel_open=1)  # type: ignore[arg-type]


async def test_serve_forever_refuses_callbacks_that_cannot_be_called() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        with pytest.raises(TypeError, match="on_connected"):
            # Not callable: bad input on purpose.
            await running.server.serve_forever(on_connected="nope")  # type: ignore[arg-type]


async def test_async_handler_callbacks_and_key_function_run() -> None:
    opened: list[str] = []
    closed: list[str] = []
    done = asyncio.Event()

    async def key(channel: tunnel.TunnelChannel) -> object:
        await asyncio.sleep(0)
        return key_from_metadata(channel)

    async def on_open(channel: tunnel.TunnelChannel) -> None:
        await asyncio.sleep(0)
        opened.append(str(key_from_metadata(channel)))

    async def on_close(channel: tunnel.TunnelChannel) -> None:
        await asyncio.sleep(0)
        closed.append(str(key_from_metadata(channel)))
        done.set()

    handler = tunnel.TunnelServiceHandler(
        affinity_key=key, on_reverse_tunnel_open=on_open, on_reverse_tunnel_close=on_close
    )
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        serving = running.serve({KEY_HEADER: "dev"})
        await registered(handler, "dev", serving)
        assert await who(handler.key_as_channel("dev")) == "dev"
        assert opened == ["dev"]
        running.server.close()
        async with asyncio.timeout(PROMPT):
            await done.wait()
        assert closed == ["dev"]


async def test_failing_key_function_refuses_the_tunnel(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.ERROR, logger="tunnel")

    def key(channel: tunnel.TunnelChannel) -> object:
        raise LookupError("no such device")

    handler = tunnel.TunnelServiceHandler(affinity_key=key)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        with pytest.raises(GRPCError) as exc_info:
            async with asyncio.timeout(PROMPT):
                await running.server.serve()
        assert exc_info.value.status is Status.INTERNAL
        assert handler.all_reverse_tunnels() == []
        assert any("affinity_key" in r.getMessage() for r in caplog.records)


async def test_key_function_refuses_with_its_own_status() -> None:
    def key(channel: tunnel.TunnelChannel) -> object:
        raise GRPCError(Status.ALREADY_EXISTS, "kitchen is taken")

    handler = tunnel.TunnelServiceHandler(affinity_key=key)
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router(handler) as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        with pytest.raises(GRPCError) as exc_info:
            async with asyncio.timeout(PROMPT):
                await running.server.serve()
        assert (exc_info.value.status, exc_info.value.message) == (
            Status.ALREADY_EXISTS,
            "kitchen is taken",
        )
        assert handler.all_reverse_tunnels() == []
