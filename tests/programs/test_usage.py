"""Bad usage gets one clear line and exit status 2; settings come from flags over a file."""

from __future__ import annotations

import hashlib
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.programs.support import ROOT, Router, assert_usage_errors, grpctunnel, processes
from tunnel.cli._config import Address, UsageError, address
from tunnel.cli._tokens import TokenFile


@pytest.fixture
def busy_port() -> Iterator[int]:
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()
    try:
        yield sock.getsockname()[1]
    finally:
        sock.close()


def test_bad_usage_is_one_line_and_exit_status_2(tmp_path: Path, busy_port: int) -> None:
    bad_toml = tmp_path / "bad.toml"
    bad_toml.write_text("listen = [\n")
    typo = tmp_path / "typo.toml"
    typo.write_text('listen = "127.0.0.1:0"\nkey-headr = "x"\n')
    bad_tokens = tmp_path / "tokens.toml"
    bad_tokens.write_text('[[agents]]\ntoken-sha256 = "abc"\nkeys = ["k"]\n')
    cases = {
        ("router",): "--listen is required",
        ("router", "--listen", "nowhere"): "'nowhere' is not HOST:PORT",
        ("router", "--listen", "127.0.0.1:99999"): "port must be a number",
        ("router", "--listen", f"127.0.0.1:{busy_port}"): f"127.0.0.1:{busy_port}",
        ("router", "--listen", "127.0.0.1:0", "--on-duplicate", "maybe"): "'maybe' is not one of",
        ("router", "--listen", "127.0.0.1:0", "--grace-period", "-1"): "--grace-period",
        ("router", "--listen", "127.0.0.1:0", "--key-header", "Tunnel Key"): "--key-header",
        (
            "router",
            "--listen",
            "127.0.0.1:0",
            "--tls-cert",
            "/nonexistent.pem",
        ): "--tls-key go together",
        ("router", "--listen", "127.0.0.1:0", "--agent-tokens", str(bad_tokens)): "64 hex digits",
        ("router", "--listen", "127.0.0.1:0", "--agent-tokens", "/no/such"): "no such file",
        ("router", "--config", str(bad_toml)): "not valid TOML",
        ("router", "--config", str(typo)): "'key-headr' is not a setting of router",
        ("router", "--bogus"): "unrecognized arguments: --bogus",
        ("agent", "--router", "127.0.0.1:1", "--backend", "127.0.0.1:2"): "--key is required",
        (
            "agent",
            "--router",
            "127.0.0.1:1",
            "--backend",
            "127.0.0.1:2",
            "--key",
            "k",
            "--token-file",
            "/no/such/token",
        ): "no such file",
        ("frobnicate",): "invalid choice",
    }
    assert_usage_errors(cases)


def test_help_shows_the_defaults() -> None:
    done = grpctunnel("router", "--help")
    assert done.returncode == 0
    assert "(default: tunnel-key)" in done.stdout
    assert "(default: replace)" in done.stdout
    done = grpctunnel("agent", "--help")
    assert "(default: 30)" in done.stdout and "--allow-method" in done.stdout


def test_without_the_extra_the_router_says_what_to_install() -> None:
    code = (
        "import sys; sys.modules['aiohttp'] = None; from tunnel.cli import main; "
        "sys.exit(main(['router', '--listen', '127.0.0.1:0']))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [
        "grpctunnel router: error: router needs the 'router' extra (aiohttp): "
        "pip install 'grpclib-tunnel[router]'"
    ]


def test_the_library_does_not_import_the_programs_dependencies() -> None:
    code = (
        "import sys, tunnel, tunnel.proxy, tunnel.reverse; "
        "names = ('aiohttp', 'prometheus_client', 'tunnel.cli'); "
        "print(sorted(m for m in names if m in sys.modules))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=30
    )
    assert done.stdout.strip() == "[]", done.stderr


def test_flags_win_over_the_config_file(tmp_path: Path) -> None:
    config = tmp_path / "grpctunnel.toml"
    config.write_text(
        'log-format = "json"\n'
        "[router]\n"
        'listen = "127.0.0.1:0"\n'
        'key-header = "x-from-file"\n'
        'on-duplicate = "reject"\n'
        "[agent]\n"
        'key = "ignored by the router"\n'
    )
    with processes() as started:
        # Router() passes --listen and --log-format itself; the file gives the rest.
        router = started.add(Router("--config", str(config), "--key-header", "x-from-flag"))
        line = router.wait_event("router_listening")
        assert line["key_header"] == "x-from-flag"
        assert line["on_duplicate"] == "reject"


def test_hash_token_prints_what_the_tokens_file_holds(tmp_path: Path) -> None:
    token = tmp_path / "token"
    token.write_text("hunter2\n")
    digest = hashlib.sha256(b"hunter2").hexdigest()
    assert grpctunnel("hash-token", str(token)).stdout.strip() == digest
    assert grpctunnel("hash-token", "-", stdin="hunter2\n").stdout.strip() == digest


def test_addresses() -> None:
    assert address("127.0.0.1:0") == Address("127.0.0.1", 0)
    assert address("[::1]:443") == Address("::1", 443)
    assert str(Address("::1", 443)) == "[::1]:443"
    for bad in ("127.0.0.1", ":80", "::1:80", "[nope]:1", "host:http", "host:-1"):
        with pytest.raises(ValueError):
            address(bad)


def test_token_file_grants(tmp_path: Path) -> None:
    file = tmp_path / "tokens.toml"
    digest = hashlib.sha256(b"tok").hexdigest()
    file.write_text(f'[[agents]]\ntoken-sha256 = "{digest.upper()}"\nkeys = ["site-*", "hq"]\n')
    grants = TokenFile.load(file)
    grant = grants.grant_for("tok")
    assert grant is not None and grant.name == "agents entry 1"
    assert grant.allows("site-7") and grant.allows("hq")
    assert not grant.allows("SITE-7") and not grant.allows("hq2")
    assert grants.grant_for("other") is None
    file.write_text(f'[[agents]]\ntoken-sha256 = "{digest}"\nkeys = []\n')
    with pytest.raises(UsageError, match="non-empty list"):
        TokenFile.load(file)
