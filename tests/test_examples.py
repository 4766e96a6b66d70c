"""The programs in examples/ and the demo run, succeed, and say what they should."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"

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
