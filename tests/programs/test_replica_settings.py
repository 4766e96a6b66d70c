"""The replicas' settings: what goes together, bad values, and mutual TLS between routers."""

from __future__ import annotations

import asyncio
import ssl
import subprocess
import sys
from pathlib import Path

import grpclib.client
import pytest
import trustme
from grpclib.const import Status
from grpclib.exceptions import GRPCError, StreamTerminatedError

from tests.programs.cluster import RedisServer
from tests.programs.support import (
    ROOT,
    Agent,
    Backend,
    Callers,
    Router,
    assert_usage_errors,
    grpctunnel,
    processes,
)
from tests.stubs.pb import test_grpc, test_pb2
from tunnel.cli import main

TEST_TIMEOUT = 30.0


def test_replica_settings_go_together(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    base = ("router", "--listen", "127.0.0.1:0")
    registry = ("--registry", "redis://127.0.0.1:1/0")
    cases = {
        (*base, "--peer-listen", "127.0.0.1:0"): "--peer-listen needs --registry",
        (*base, "--router-id", "r1"): "--router-id needs --registry",
        (*base, *registry, "--peer-listen", "127.0.0.1:0"): "--registry needs --router-id",
        (*base, *registry, "--router-id", "r1"): "--registry needs --peer-listen",
        (*base, *registry, "--router-id", "r1", "--peer-listen", "127.0.0.1:0",
         "--peer-tls-cert", str(secret)): "go together",
        (*base, "--registry", "http://h:1/0"): "not a redis:// or rediss:// URL",
        (*base, "--registry", "redis://h/0"): "say which host and port",
        (*base, "--registry", "redis://:hunter2@h:1/0"): "$GRPCTUNNEL_REGISTRY_PASSWORD",
        (*base, "--registry", "redis://h:1/zero"): "the database is a number",
        (*base, "--registry-ttl", "0"): "--registry-ttl: expected seconds > 0",
    }  # fmt: skip
    for args, expected in cases.items():
        assert main(list(args)) == 2, args
        lines = capsys.readouterr().err.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], (args, lines)
        assert "hunter2" not in lines[0]


def test_what_is_checked_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    empty.write_text("\n")
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    joined = (
        "router", "--listen", "127.0.0.1:0", "--registry", "redis://127.0.0.1:1/0",
        "--router-id", "r1",
    )  # fmt: skip
    cases = {
        (
            *joined,
            "--peer-listen",
            "127.0.0.1:0",
        ): "--peer-secret-file (or $GRPCTUNNEL_PEER_SECRET)",
        (*joined, "--peer-listen", "127.0.0.1:0", "--peer-secret-file", str(empty)): "is empty",
        (*joined, "--peer-listen", "0.0.0.0:0", "--peer-secret-file", str(secret)): "--advertise",
    }
    assert_usage_errors(cases, workers=3)


def test_help_shows_the_replica_settings() -> None:
    done = grpctunnel("router", "--help")
    assert "--registry URL" in done.stdout and "--peer-listen HOST:PORT" in done.stdout
    assert "(default: 30)" in done.stdout  # --registry-ttl


def test_without_redis_py_a_router_with_a_registry_says_what_to_install(tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.write_text("s\n")
    code = (
        "import sys; sys.modules['redis'] = None; from tunnel.cli import main; "
        "sys.exit(main(['router', '--listen', '127.0.0.1:0', '--registry', "
        "'redis://127.0.0.1:1/0', '--router-id', 'r1', '--peer-listen', '127.0.0.1:0', "
        f"'--peer-secret-file', {str(secret)!r}]))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.returncode == 2, done.stderr
    assert "pip install 'grpclib-tunnel[router]'" in done.stderr


def test_the_library_does_not_import_redis() -> None:
    code = "import sys, tunnel, tunnel.proxy, tunnel.reverse; print('redis' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.stdout.strip() == "False", done.stderr


async def test_mutual_tls_between_routers(
    backend: Backend, caller: Callers, redis_server: RedisServer, tmp_path: Path
) -> None:
    authority = trustme.CA()
    files = {}
    for name in ("r1", "r2"):
        issued = authority.issue_cert("127.0.0.1", "localhost")
        cert, key = tmp_path / f"{name}.pem", tmp_path / f"{name}.key"
        issued.private_key_and_cert_chain_pem.write_to_path(cert)
        issued.private_key_pem.write_to_path(key)
        files[name] = (cert, key)
    ca = tmp_path / "ca.pem"
    authority.cert_pem.write_to_path(ca)
    with processes() as started:
        routers = []
        for name in ("r1", "r2"):
            cert, key = files[name]
            routers.append(
                started.add(
                    Router(
                        "--registry",
                        redis_server.url,
                        "--router-id",
                        name,
                        "--peer-listen",
                        "127.0.0.1:0",
                        "--peer-tls-cert",
                        str(cert),
                        "--peer-tls-key",
                        str(key),
                        "--peer-tls-ca",
                        str(ca),
                    )
                )
            )
        r1, r2 = routers
        started.add(Agent(r2, backend, "secure"))
        peer = r2.wait_event("router_listening")["peer"]
        async with asyncio.timeout(TEST_TIMEOUT):
            reply = await caller.stub(r1).Unary(
                test_pb2.Message(payload=b"mtls"), metadata={"tunnel-key": "secure"}
            )
            assert reply.payload == b"mtls"
            # Without a client certificate the peer listener does not answer.
            context = ssl.create_default_context(cafile=str(ca))
            context.set_alpn_protocols(["h2"])
            host, _, port = peer.rpartition(":")
            channel = grpclib.client.Channel(host, int(port), ssl=context)
            try:
                with pytest.raises(
                    (GRPCError, StreamTerminatedError, OSError, ssl.SSLError)
                ) as failure:
                    await test_grpc.TestServiceStub(channel).Unary(
                        test_pb2.Message(), metadata={"tunnel-key": "secure"}, timeout=5
                    )
                if isinstance(failure.value, GRPCError):
                    assert failure.value.status is not Status.OK
            finally:
                channel.close()


def test_the_replica_settings_come_from_the_config_file_too(tmp_path: Path) -> None:
    from tunnel.cli import _parser
    from tunnel.cli._config import Address, load_settings
    from tunnel.cli._settings import ROUTER

    config = tmp_path / "grpctunnel.toml"
    config.write_text(
        "[router]\n"
        'listen = "127.0.0.1:0"\n'
        'registry = "redis://redis.internal:6379/2"\n'
        'router-id = "router-a"\n'
        'peer-listen = "0.0.0.0:8444"\n'
        'advertise = "router-a.internal:8444"\n'
        'peer-secret-file = "/etc/grpctunnel/peer.secret"\n'
        "registry-ttl = 12\n"
    )
    _, subparsers = _parser()
    values = load_settings(
        subparsers["router"], ROUTER, ["--config", str(config), "--router-id", "router-b"],
        command="router",
    )  # fmt: skip
    assert values["registry"] == "redis://redis.internal:6379/2"
    assert values["router_id"] == "router-b"  # the flag wins
    assert values["peer_listen"] == Address("0.0.0.0", 8444)
    assert values["advertise"] == Address("router-a.internal", 8444)
    assert values["peer_secret_file"] == Path("/etc/grpctunnel/peer.secret")
    assert values["registry_ttl"] == 12.0
