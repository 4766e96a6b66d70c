"""Three routers sharing a real Redis registry: any router reaches every key.

One redis-server, three routers (each its own port, a round-robin balancer
in front of them), and an agent on each router serve every test in this
module; they keep no state between calls.  A call that enters a router
whose key another router holds crosses the peer hop: the four call kinds,
metadata, status details, deadlines and cancellation must come through it
as through one router.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from dataclasses import dataclass

import grpclib.client
import pytest
from google.protobuf import any_pb2
from google.rpc import error_details_pb2
from grpclib.const import Status
from grpclib.exceptions import GRPCError

from tests.programs.cluster import SECRET, Balancer, RedisServer, Replica, secret_file
from tests.programs.support import (
    Agent,
    Backend,
    Callers,
    four_call_kinds,
    metadata_both_ways,
    metrics,
    processes,
    tunnels,
)
from tests.stubs.pb import test_grpc, test_pb2

TEST_TIMEOUT = 30.0
#: How long the routers let a call wait for its key to appear.
WAIT = 3.0


@dataclass
class Cluster:
    redis: RedisServer
    routers: list[Replica]
    agents: dict[str, Agent]
    balancer: Balancer
    backend: Backend


@pytest.fixture(scope="module")
def cluster(backend: Backend, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    secret = secret_file(tmp_path_factory.mktemp("replicas"))
    redis = RedisServer()
    try:
        with processes() as started:
            routers = [
                started.add(Replica(redis, f"r{i}", secret, "--wait-for-tunnel", str(WAIT)))
                for i in (1, 2, 3)
            ]
            agents = {
                f"k{i}": started.add(Agent(router, backend, f"k{i}"))
                for i, router in enumerate(routers, 1)
            }
            balancer = started.add(Balancer(*routers))
            yield Cluster(redis, routers, agents, balancer, backend)
    finally:
        redis.stop()


def message(**fields: object) -> test_pb2.Message:
    return test_pb2.Message(**fields)  # type: ignore[arg-type]


def stub_to(caller: Callers, address: str) -> test_grpc.TestServiceStub:
    host, _, port = address.rpartition(":")
    channel = grpclib.client.Channel(host, int(port))
    caller.channels.append(channel)
    return test_grpc.TestServiceStub(channel)


async def test_every_router_and_the_balancer_reach_every_key(
    cluster: Cluster, caller: Callers
) -> None:
    entries = [r.address for r in cluster.routers] + [cluster.balancer.address] * 3
    async with asyncio.timeout(TEST_TIMEOUT):
        for entry in entries:
            stub = stub_to(caller, entry)
            for key in cluster.agents:
                reply = await stub.Unary(
                    message(payload=key.encode()), metadata={"tunnel-key": key}
                )
                assert reply.payload == key.encode()
                assert reply.headers["tunnel-key"] == key.encode()


async def test_the_four_call_kinds_across_the_peer_hop(cluster: Cluster, caller: Callers) -> None:
    stub = caller.stub(cluster.routers[0])
    routed = {"tunnel-key": "k3"}  # held by r3: every call crosses r1 -> r3
    before = await metrics(cluster.routers[0].admin)
    async with asyncio.timeout(TEST_TIMEOUT):
        await four_call_kinds(stub, routed)
    after = await metrics(cluster.routers[0].admin)
    peer = ("grpctunnel_router_calls_by_route_total", (("route", "peer"),))
    forwarded = ("grpctunnel_router_peer_forwards_total", (("result", "forwarded"),))
    assert after[peer] - before[peer] == 4
    assert after[forwarded] - before[forwarded] == 4


async def test_metadata_and_details_across_the_peer_hop(cluster: Cluster, caller: Callers) -> None:
    stub = caller.stub(cluster.routers[1])
    metadata = {
        "tunnel-key": "k1",
        "authorization": "Bearer caller-secret",
        # A caller cannot pass for a router, nor smuggle the peers' headers through.
        "grpctunnel-peer-secret": "guess",
    }
    async with asyncio.timeout(TEST_TIMEOUT):
        received = await metadata_both_ways(stub, metadata)
    assert received["tunnel-key"] == b"k1"
    assert "authorization" not in received
    assert not [name for name in received if name.startswith("grpctunnel-")]

    detail = any_pb2.Any()
    detail.Pack(error_details_pb2.ErrorInfo(reason="NO_TOAST", domain="kitchen.example"))
    with pytest.raises(GRPCError) as failure:
        async with asyncio.timeout(TEST_TIMEOUT):
            await stub.Unary(
                message(code=Status.FAILED_PRECONDITION.value, error_details=[detail]),
                metadata={"tunnel-key": "k3"},
            )
    assert failure.value.status is Status.FAILED_PRECONDITION
    (info,) = failure.value.details
    assert isinstance(info, error_details_pb2.ErrorInfo)
    assert (info.reason, info.domain) == ("NO_TOAST", "kitchen.example")


async def test_deadlines_and_cancellation_across_the_peer_hop(
    cluster: Cluster, caller: Callers
) -> None:
    stub = caller.stub(cluster.routers[2])
    backend = cluster.backend
    routed = {"tunnel-key": "k2"}
    async with asyncio.timeout(TEST_TIMEOUT):
        mark = backend.mark()
        await stub.Unary(message(), metadata={**routed, "x-call-id": "peer-deadline"}, timeout=7)
        seen = await backend.event("call", after=mark, id="peer-deadline")
        assert 4 < seen["deadline"] <= 7

        started = time.monotonic()
        with pytest.raises((asyncio.TimeoutError, GRPCError)) as failure:
            await stub.Unary(message(delay_millis=5000), metadata=routed, timeout=0.5)
        assert time.monotonic() - started < 3
        if isinstance(failure.value, GRPCError):
            assert failure.value.status is Status.DEADLINE_EXCEEDED

        mark = backend.mark()
        call = asyncio.create_task(
            stub.Unary(
                message(delay_millis=20_000), metadata={**routed, "x-call-id": "peer-cancel"}
            )
        )
        try:
            await backend.event("call", after=mark, id="peer-cancel")
        finally:
            call.cancel()
            await asyncio.gather(call, return_exceptions=True)
        cancelled_at = time.monotonic()
        await backend.event("cancelled", 5, after=mark, id="peer-cancel")
        assert time.monotonic() - cancelled_at < 2


async def test_tunnels_marks_local_and_remote_keys(cluster: Cluster) -> None:
    r1 = cluster.routers[0]
    listed = await tunnels(r1.admin)
    local = [t for t in listed if t["route"] == "local"]
    remote = {t["key"]: t for t in listed if t["route"] == "remote"}
    assert [(t["key"], t["router"]) for t in local] == [("k1", "r1")]
    assert local[0]["agent_instance"] == cluster.agents["k1"].instance
    assert set(remote) == {"k2", "k3"}
    assert (
        remote["k2"]["router"] == "r2" and remote["k2"]["address"] == cluster.routers[1].advertise
    )
    assert remote["k3"]["router"] == "r3"


async def test_a_forwarded_call_is_never_forwarded_again(cluster: Cluster, caller: Callers) -> None:
    r1, _, r3 = cluster.routers
    before = await metrics(r1.admin)
    # Marked as forwarded already: r1 does not hold k3, and must not pass it on.
    async with (
        asyncio.timeout(TEST_TIMEOUT),
        caller.stub(r1).Unary.open(
            metadata={"tunnel-key": "k3", "grpctunnel-forwarded-by": "r2"}
        ) as call,
    ):
        await call.send_message(message(), end=True)
        with pytest.raises(GRPCError) as failure:
            await call.recv_message()
    assert failure.value.status is Status.UNAVAILABLE
    assert "r1 does not hold key 'k3'" in (failure.value.message or "")
    after = await metrics(r1.admin)
    forwards = [k for k in after if k[0] == "grpctunnel_router_peer_forwards_total"]
    assert all(after[k] == before[k] for k in forwards)

    # The peer listener: only with the secret, and only for the keys held there.
    peer = stub_to(caller, r3.peer)
    async with asyncio.timeout(TEST_TIMEOUT):
        with pytest.raises(GRPCError) as failure:
            await peer.Unary(message(), metadata={"tunnel-key": "k3"})
        assert failure.value.status is Status.UNAUTHENTICATED
        with pytest.raises(GRPCError) as failure:
            await peer.Unary(
                message(), metadata={"tunnel-key": "k1", "grpctunnel-peer-secret": SECRET}
            )
        assert failure.value.status is Status.UNAVAILABLE
        assert "does not hold key 'k1'" in (failure.value.message or "")
        reply = await peer.Unary(
            message(payload=b"ok"), metadata={"tunnel-key": "k3", "grpctunnel-peer-secret": SECRET}
        )
        assert reply.payload == b"ok"


async def test_a_call_waits_for_its_key_to_appear_on_any_router(
    cluster: Cluster, caller: Callers
) -> None:
    stub = caller.stub(cluster.routers[0])
    lookups = ("grpctunnel_router_registry_operation_seconds_count", (("operation", "lookup"),))
    before = await metrics(cluster.routers[0].admin)
    with processes() as started:
        async with asyncio.timeout(TEST_TIMEOUT):
            call = asyncio.create_task(
                stub.Unary(message(payload=b"late"), metadata={"tunnel-key": "late"})
            )
            agent = await asyncio.to_thread(
                Agent, cluster.routers[2], cluster.backend, "late", wait=False
            )
            started.add(agent)
            opened = await cluster.routers[2].event("tunnel_opened", key="late")
            assert opened["registered"] is True
            registered = time.monotonic()
            reply = await call
            assert time.monotonic() - registered < 1.0
            assert reply.payload == b"late"
            # Woken by the registry's notice, not a poll of the registry: one
            # lookup before the wait, one after the notice.
            after = await metrics(cluster.routers[0].admin)
            assert after[lookups] - before[lookups] == 2
            agent.stop()
            await cluster.routers[2].event("tunnel_closed", key="late")

            started_at = time.monotonic()
            with pytest.raises(GRPCError) as failure:
                await stub.Unary(message(), metadata={"tunnel-key": "late"})
            assert failure.value.status is Status.UNAVAILABLE
            assert "'late'" in (failure.value.message or "")
            assert WAIT - 0.5 < time.monotonic() - started_at < WAIT + 2


async def test_metrics_of_the_registry(cluster: Cluster) -> None:
    counted = await metrics(cluster.routers[0].admin)
    assert counted[("grpctunnel_router_registry_up", ())] == 1
    lookups = ("grpctunnel_router_registry_operation_seconds_count", (("operation", "lookup"),))
    refreshes = ("grpctunnel_router_registry_operation_seconds_count", (("operation", "refresh"),))
    assert counted[lookups] >= 1
    assert counted[refreshes] >= 1
    labels = {label for _, pairs in counted for label, _ in pairs}
    assert labels <= {"code", "reason", "le", "route", "result", "operation"}
