"""``serve_forever``: the reverse tunnel comes back after the server or connection drops."""

from __future__ import annotations

import asyncio
import logging

import pytest
from grpclib.config import Configuration

import tunnel

from .support import (
    KEY_HEADER,
    PROMPT,
    TEST_TIMEOUT,
    Backoff,
    Device,
    LogWatch,
    Proxy,
    Recorder,
    connected,
    device_server,
    key_from_metadata,
    registered,
    router,
    who,
)

#: Small but not busy-looping: reconnects in tests take tens of milliseconds.
BACKOFF: Backoff = {"min_backoff": 0.01, "max_backoff": 0.05, "jitter": 0.2}

#: Keepalive settings for a device's channel (docs/reverse.md, "Dead peers").
KEEPALIVE = Configuration(
    _keepalive_time=1.0,
    _keepalive_timeout=1.0,
    _keepalive_permit_without_calls=True,
    _http2_max_pings_without_data=0,
)


@pytest.mark.parametrize("keepalive", [False, True], ids=["plain", "keepalive"])
async def test_serve_forever_reconnects_after_the_server_restarts(
    keepalive: bool, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="tunnel")
    service = Device("dev")
    config = KEEPALIVE if keepalive else None
    async with asyncio.timeout(TEST_TIMEOUT), router() as first:
        port = first.port
        async with (
            connected(port, config=config) as channel,
            device_server(channel, [service]) as running,
        ):
            forever = asyncio.create_task(
                running.server.serve_forever({KEY_HEADER: "dev"}, **BACKOFF)
            )
            running.tasks.append(forever)
            await registered(first.handler, "dev", forever)
            assert await who(first.handler.key_as_channel("dev")) == "dev"

            await first.crash()
            # The same port, a new server (port 0 was bound first; this reuses
            # the number the kernel chose).
            async with router(port=port) as second:
                await registered(second.handler, "dev", forever)
                assert await who(second.handler.key_as_channel("dev")) == "dev"
                reconnects = [r for r in caplog.records if "reconnecting in" in r.getMessage()]
                assert reconnects, caplog.text
                assert all(r.levelno == logging.WARNING for r in reconnects)
                # Each line says why the tunnel ended.
                assert "ended (" in reconnects[0].getMessage()

                running.server.close()
                async with asyncio.timeout(PROMPT):
                    await forever  # returns once closed
                assert not second.handler.key_as_channel("dev").is_ready()


async def test_serve_forever_reconnects_after_the_network_server_ends_the_tunnel(
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.WARNING, logger="tunnel")
    service = Device("dev")
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port, config=KEEPALIVE) as channel,
        device_server(channel, [service]) as running,
    ):
        forever = asyncio.create_task(running.server.serve_forever({KEY_HEADER: "dev"}, **BACKOFF))
        running.tasks.append(forever)
        for _ in range(3):
            await registered(net.handler, "dev", forever)
            (reverse,) = net.handler.all_reverse_tunnels()
            assert await who(reverse) == "dev"
            await reverse.aclose()
        await registered(net.handler, "dev", forever)
        messages = [r.getMessage() for r in caplog.records if "reconnecting" in r.getMessage()]
        assert len(messages) == 3
        assert all("the network server closed the tunnel" in m for m in messages)
        assert [m.split()[3] for m in messages] == ["1", "2", "3"]  # "attempt N"
        running.server.close()
        async with asyncio.timeout(PROMPT):
            await forever


async def test_serve_forever_keeps_trying_while_nobody_listens() -> None:
    async with asyncio.timeout(TEST_TIMEOUT):
        async with router() as gone:
            port = gone.port
        # Nothing listens on the port now.
        with LogWatch("reconnecting in") as reconnects:
            async with (
                connected(port) as channel,
                device_server(channel, [Device("dev")]) as running,
            ):
                forever = asyncio.create_task(
                    running.server.serve_forever({KEY_HEADER: "dev"}, **BACKOFF)
                )
                running.tasks.append(forever)
                await reconnects.wait(3)
                assert not forever.done()
                assert all("ConnectionRefusedError" in m for m in reconnects.messages)
                async with router(port=port) as back:
                    await registered(back.handler, "dev", forever)
                    running.server.close()
                    async with asyncio.timeout(PROMPT):
                        await forever


async def test_serve_forever_rejects_bad_backoff() -> None:
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        router() as net,
        connected(net.port) as channel,
        device_server(channel, [Device("dev")]) as running,
    ):
        bad_settings: list[Backoff] = [
            {"min_backoff": 0},
            {"min_backoff": 2, "max_backoff": 1},
            {"jitter": 1.0},
            {"jitter": -0.1},
        ]
        for bad in bad_settings:
            with pytest.raises(ValueError):
                await running.server.serve_forever(**bad)


#: Keepalive tight enough for a test: a silent peer is found within ~1 s.
FAST_KEEPALIVE = Configuration(
    _keepalive_time=0.2,
    _keepalive_timeout=0.5,
    _keepalive_permit_without_calls=True,
    _http2_max_pings_without_data=0,
    _http2_min_sent_ping_interval_without_data=0.2,
)


async def test_keepalive_finds_a_silent_peer_on_both_ends() -> None:
    """The path goes dead without a FIN or RST: keepalive ends the tunnel on both ends.

    The device's serve_forever reconnects; the network server's pool forgets
    the dead tunnel instead of handing it out.
    """
    log = Recorder()
    handler = tunnel.TunnelServiceHandler(
        affinity_key=key_from_metadata,
        on_reverse_tunnel_open=lambda c: log.add("open", c),
        on_reverse_tunnel_close=lambda c: log.add("close", c),
    )
    with LogWatch("reconnecting in") as reconnects:
        async with (
            asyncio.timeout(TEST_TIMEOUT),
            router(handler, config=FAST_KEEPALIVE) as net,
            Proxy(net.port) as proxy,
            connected(proxy.port, config=FAST_KEEPALIVE) as channel,
            device_server(channel, [Device("dev")]) as running,
        ):
            forever = asyncio.create_task(
                running.server.serve_forever({KEY_HEADER: "dev"}, **BACKOFF)
            )
            running.tasks.append(forever)
            await registered(handler, "dev", forever)
            assert await who(handler.key_as_channel("dev")) == "dev"

            proxy.freeze()
            async with asyncio.timeout(5):
                await log.wait_for("close")  # the network server noticed
                await reconnects.wait(1)  # the device noticed
                await log.wait_for("open", 2)  # and came back
            assert len(handler.all_reverse_tunnels()) == 1
            assert await who(handler.key_as_channel("dev")) == "dev"
            running.server.close()
            async with asyncio.timeout(PROMPT):
                await forever
