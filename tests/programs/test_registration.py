"""Who may register under which key, and what happens when two agents want one key."""

from __future__ import annotations

import asyncio
import hashlib
import ssl
from pathlib import Path

import grpclib.client
import pytest
import trustme
from grpclib.const import Status
from grpclib.exceptions import GRPCError

import tunnel
from tests.programs.support import (
    Agent,
    Backend,
    Callers,
    Router,
    metrics,
    processes,
    reaching_backend,
    tunnels,
)
from tests.stubs.pb import test_pb2
from tunnel.cli._settings import AGENT_INSTANCE_HEADER, AGENT_KEY_HEADER

TEST_TIMEOUT = 40.0
TOKEN = "s3cret-kitchen-token"


@pytest.fixture
def tokens(tmp_path: Path) -> Path:
    digest = hashlib.sha256(TOKEN.encode()).hexdigest()
    file = tmp_path / "tokens.toml"
    file.write_text(
        f'[[agents]]\nname = "kitchen devices"\ntoken-sha256 = "{digest}"\n'
        'keys = ["kitchen", "kitchen-*"]\n'
    )
    return file


def token_file(tmp_path: Path, token: str) -> str:
    file = tmp_path / f"token-{hashlib.sha256(token.encode()).hexdigest()[:8]}"
    file.write_text(token + "\n")
    return str(file)


async def test_tokens_and_key_patterns(
    backend: Backend, tokens: Path, tmp_path: Path, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router("--agent-tokens", str(tokens)))
        async with asyncio.timeout(TEST_TIMEOUT):
            started.add(
                Agent(router, backend, "kitchen-2", "--token-file", token_file(tmp_path, TOKEN))
            )
            reply = await caller.stub(router).Unary(
                test_pb2.Message(payload=b"ok"), metadata={"tunnel-key": "kitchen-2"}
            )
            assert reply.payload == b"ok"
            (registered,) = await tunnels(router.admin)
            assert registered["token"] == "kitchen devices"

            for key, token, code in (
                ("kitchen", "wrong-token", "UNAUTHENTICATED"),
                ("kitchen", None, "UNAUTHENTICATED"),
                ("attic", TOKEN, "PERMISSION_DENIED"),
            ):
                flags = ("--token-file", token_file(tmp_path, token)) if token else ()
                refused = started.add(Agent(router, backend, key, *flags, wait=False))
                assert await refused.exited() == 1
                final = refused.wait_event("agent_refused")
                assert code in final["message"] and router.address in final["message"]
                await router.event("registration_refused", code=code, key=key)
            counted = await metrics(router.admin)
            refusals = {
                labels: value
                for (name, labels), value in counted.items()
                if name == "grpctunnel_router_registrations_refused_total"
            }
            # Each refused agent tried three times (the library's policy) before giving up.
            assert refusals[(("code", "UNAUTHENTICATED"),)] == 6
            assert refusals[(("code", "PERMISSION_DENIED"),)] == 3
        for process in started:
            assert TOKEN not in process.text()
            assert "wrong-token" not in process.text()


async def test_replace_hands_the_key_to_the_newest_and_drains_the_old(
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router("--on-duplicate", "replace"))
        first = started.add(Agent(router, backend, "shared"))
        stub = caller.stub(router)
        async with asyncio.timeout(TEST_TIMEOUT):
            slow = await reaching_backend(
                backend,
                stub.Unary(
                    test_pb2.Message(payload=b"old", delay_millis=1500),
                    metadata={"tunnel-key": "shared", "x-call-id": "on-old"},
                ),
                "on-old",
            )
            second = started.add(
                Agent(router, backend, "shared", "--min-backoff", "5", "--max-backoff", "5")
            )
            await router.event("tunnel_opened", key="shared", instance=second.instance)
            # The old tunnel takes no new calls but finishes the one it has.
            assert (await slow).payload == b"old"
            closed = await router.event("tunnel_closed", instance=first.instance)
            assert closed["reason"].startswith("replaced by a newer tunnel")
            assert closed["calls"] == 1
            listed = await tunnels(router.admin)
            assert second.instance in [t["agent_instance"] for t in listed]
            counted = await metrics(router.admin)
            assert (
                counted[("grpctunnel_router_tunnels_closed_total", (("reason", "replaced"),))] >= 1
            )


async def test_allow_spreads_calls_over_both_agents(backend: Backend, caller: Callers) -> None:
    with processes() as started:
        router = started.add(Router("--on-duplicate", "allow"))
        agents = [Agent(router, backend, "pool") for _ in range(2)]
        started.extend(agents)
        stub = caller.stub(router)
        async with asyncio.timeout(TEST_TIMEOUT):
            listed = await tunnels(router.admin)
            assert sorted(t["agent_instance"] for t in listed) == sorted(a.instance for a in agents)
            for _ in range(10):
                await stub.Unary(test_pb2.Message(), metadata={"tunnel-key": "pool"})
            for agent in agents:
                counted = await metrics(agent.admin)
                assert counted[("grpctunnel_agent_calls_total", (("code", "OK"),))] == 5


async def test_reject_refuses_a_second_agent_until_the_first_is_gone(
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router("--on-duplicate", "reject"))
        first = started.add(Agent(router, backend, "single"))
        async with asyncio.timeout(TEST_TIMEOUT):
            second = started.add(Agent(router, backend, "single", wait=False))
            await router.event(
                "registration_refused", code="ALREADY_EXISTS", instance=second.instance
            )
            second.wait_for(lambda line: "ALREADY_EXISTS" in line.get("message", ""))
            (listed,) = await tunnels(router.admin)
            assert listed["agent_instance"] == first.instance
            # The refused agent stands by and takes over once the key is free.
            first.stop()
            await router.event("tunnel_opened", key="single", instance=second.instance)
            reply = await caller.stub(router).Unary(
                test_pb2.Message(payload=b"standby"), metadata={"tunnel-key": "single"}
            )
            assert reply.payload == b"standby"


async def test_reject_lets_the_same_agent_instance_replace_its_stale_tunnel() -> None:
    """A reconnect of one agent (same instance header) is not a second agent."""
    with processes() as started:
        router = started.add(Router("--on-duplicate", "reject"))
        metadata = {AGENT_KEY_HEADER: "again", AGENT_INSTANCE_HEADER: "instance-1"}
        channel = grpclib.client.Channel("127.0.0.1", router.port)
        devices = [tunnel.ReverseTunnelServer(channel, []) for _ in range(2)]
        serving: list[asyncio.Task[None]] = []
        try:
            async with asyncio.timeout(TEST_TIMEOUT):
                serving.append(asyncio.create_task(devices[0].serve(metadata)))
                await router.event("tunnel_opened", key="again")
                serving.append(asyncio.create_task(devices[1].serve(metadata)))
                mark = router.mark()
                await router.event("tunnel_opened", key="again", after=mark)
                closed = await router.event("tunnel_closed", key="again")
                assert closed["reason"] == "replaced by a reconnect of the same agent"
                await serving[0]  # the stale tunnel was ended by the router
                assert len(await tunnels(router.admin)) == 1
        finally:
            for device in devices:
                device.close()
            await asyncio.gather(*serving, return_exceptions=True)
            channel.close()


async def test_allow_method_forwards_only_matching_methods(
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router())
        started.add(
            Agent(router, backend, "narrow", "--allow-method", "/grpchantesting.TestService/Un*")
        )
        stub = caller.stub(router)
        routed = {"tunnel-key": "narrow"}
        async with asyncio.timeout(TEST_TIMEOUT):
            assert (
                await stub.Unary(test_pb2.Message(payload=b"y"), metadata=routed)
            ).payload == b"y"
            mark = backend.mark()
            with pytest.raises(GRPCError) as failure:
                async with stub.ServerStream.open(
                    metadata={**routed, "x-call-id": "denied"}
                ) as call:
                    await call.send_message(test_pb2.Message(count=1), end=True)
                    await call.recv_message()
            assert failure.value.status is Status.PERMISSION_DENIED
            assert "ServerStream" in (failure.value.message or "")
        assert not [line for line in backend.lines[mark:] if line.get("id") == "denied"]


async def test_wait_for_tunnel_holds_a_call_until_its_agent_connects(
    backend: Backend, caller: Callers
) -> None:
    with processes() as started:
        router = started.add(Router("--wait-for-tunnel", "15"))
        stub = caller.stub(router)
        async with asyncio.timeout(TEST_TIMEOUT):
            # Within its deadline, the call waits no longer than the deadline.
            with pytest.raises((asyncio.TimeoutError, GRPCError)):
                await stub.Unary(test_pb2.Message(), metadata={"tunnel-key": "late"}, timeout=0.5)
            call = asyncio.create_task(
                stub.Unary(test_pb2.Message(payload=b"waited"), metadata={"tunnel-key": "late"})
            )
            started.add(Agent(router, backend, "late"))
            assert (await call).payload == b"waited"


async def test_tls_between_all_three(backend: Backend, tmp_path: Path, caller: Callers) -> None:
    authority = trustme.CA()
    certificate = authority.issue_cert("127.0.0.1", "localhost")
    cert, key, ca = tmp_path / "cert.pem", tmp_path / "key.pem", tmp_path / "ca.pem"
    certificate.private_key_and_cert_chain_pem.write_to_path(cert)
    certificate.private_key_pem.write_to_path(key)
    authority.cert_pem.write_to_path(ca)
    with processes() as started:
        router = started.add(Router("--tls-cert", str(cert), "--tls-key", str(key)))
        started.add(Agent(router, backend, "secure", "--tls-ca", str(ca)))
        client = ssl.create_default_context(cafile=str(ca))
        client.set_alpn_protocols(["h2"])
        async with asyncio.timeout(TEST_TIMEOUT):
            reply = await caller.stub(router, client).Unary(
                test_pb2.Message(payload=b"tls"), metadata={"tunnel-key": "secure"}
            )
        assert reply.payload == b"tls"
