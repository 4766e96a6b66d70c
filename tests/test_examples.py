"""The programs in examples/ and the demo run, succeed, and say what they should."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = ROOT / "examples"

EXPECTED = {
    "forward_auth.py": [
        "reply: hello alice, via a forward tunnel: first call",
        "reply: hello bob, via a forward tunnel: second call",
        "bad token refused: UNAUTHENTICATED",
    ],
    "reverse_device.py": [
        "server: device 'kitchen' registered",
        "server asked kitchen: kitchen: 21.5 C",
        "server asked garage: garage: 12.5 C",
        "server asked attic: UNAVAILABLE",
        "server: device 'garage' went away",
    ],
    "proxy_nat.py": [
        "caller -> proxy -> backend: backend got hello",
        "server streaming through the proxy: [1, 2, 3]",
        "caller -> router -> kitchen -> backend: backend got hi",
        "{'tunnel-key': 'kitchen'}: PERMISSION_DENIED (the backend says no)",
        "{'tunnel-key': 'attic'}: UNAVAILABLE",
        "no key: INVALID_ARGUMENT",
    ],
    "trio_device.py": [
        "router: device 'kitchen' registered",
        "caller asked kitchen: kitchen: 21.5 C",
        "caller gave up on a slow reading: True",
        "device kitchen: reading cancelled",
        "caller asked attic: UNAVAILABLE",
    ],
    "reverse_credentials.py": [
        "router: asked the device to open the door -> door opened",
        "rogue: asked the device to open the door -> PERMISSION_DENIED",
    ],
}


def test_every_example_is_tested() -> None:
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_example_runs(name: str) -> None:
    done = subprocess.run(
        [sys.executable, str(EXAMPLES / name)],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in EXPECTED[name]:
        assert line in done.stdout, done.stdout


def test_demo_shows_forward_and_reverse() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tunnel.demo"],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in ("bidi streaming:", "reverse tunnel open", "server -> device: b'ping the device'"):
        assert line in done.stdout, done.stdout


def test_make_demo_runs_the_nat_scenario_as_processes() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tunnel.cli.demo"],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    for line in (
        "router | tunnel opened key=kitchen",
        "caller: unary through the router -> b'hello, kitchen'",
        "caller: attic: UNAVAILABLE",
        '"key": "kitchen"',
        'grpctunnel_router_calls_total{code="OK"} 2.0',
        "stopped the router",
    ):
        assert line in done.stdout, done.stdout
    assert done.stdout.count("exit status 0") == 3, done.stdout


def test_demo_without_the_testing_extra_says_what_to_install() -> None:
    # betterproto made unimportable, as in an install without the extra
    # (.ci/install_check.py checks the same in a real one).
    without_betterproto = (
        "import runpy, sys; sys.modules['betterproto'] = None; "
        "runpy.run_module('tunnel.demo', run_name='__main__', alter_sys=True)"
    )
    done = subprocess.run(
        [sys.executable, "-c", without_betterproto],
        capture_output=True,
        text=True,
        timeout=30,
        cwd=EXAMPLES.parent,
    )
    assert done.returncode != 0
    assert done.stdout == ""
    assert done.stderr.splitlines() == [
        "python -m tunnel.demo: tunnel.testing needs the 'testing' extra: "
        "pip install 'grpclib-tunnel[testing]'"
    ]


_IMPORT = re.compile(r"^\s*(?:from|import)\s+(tunnel(?:\.\w+)*)", re.MULTILINE)


def test_examples_and_docs_use_only_public_modules() -> None:
    """What users copy from must not lean on names we may change (``_pb``, ...)."""
    sources = [*EXAMPLES.glob("*.py"), *(ROOT / "docs").glob("*.md"), ROOT / "README.md"]
    private = {
        f"{path.relative_to(ROOT)}: {module}"
        for path in sources
        for module in _IMPORT.findall(path.read_text())
        if any(part.startswith("_") for part in module.split("."))
    }
    assert not private
    # The check sees the imports it is meant to see.
    assert "tunnel.testing" in _IMPORT.findall((EXAMPLES / "forward_auth.py").read_text())
