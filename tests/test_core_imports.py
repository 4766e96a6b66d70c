"""The sans-IO core imports neither asyncio nor grpclib's I/O modules.

A driver for another event loop (trio's, natively) must be able to sit on
``tunnel._core`` alone.  Each check runs in a fresh interpreter, so modules
imported by other tests cannot hide an import.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

#: What the core must not pull in: an event loop and grpclib's I/O.
FORBIDDEN = ("asyncio", "grpclib.client", "grpclib.server", "grpclib.protocol")

#: Imports ``tunnel._core`` without running ``tunnel/__init__.py``: the
#: package object is made by hand, so only the core's own imports run.
CORE_ONLY = """
import sys, types
package = types.ModuleType("tunnel")
package.__path__ = [{path!r}]
sys.modules["tunnel"] = package
"""

REPORT = """
import json, sys
import tunnel._core
print(json.dumps(sorted(sys.modules)))
"""


def _modules_after(prelude: str) -> set[str]:
    done = subprocess.run(
        [sys.executable, "-c", prelude + REPORT],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    modules: list[str] = json.loads(done.stdout)
    return set(modules)


def _forbidden(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == f or m.startswith(f + ".") for f in FORBIDDEN))


def test_the_core_modules_import_no_event_loop_or_grpclib_io() -> None:
    modules = _modules_after(CORE_ONLY.format(path=str(ROOT / "tunnel")))
    assert "tunnel._core.client" in modules  # the core really was imported
    assert _forbidden(modules) == []


def test_importing_tunnel_core_imports_no_event_loop_or_grpclib_io() -> None:
    """``import tunnel._core`` runs ``tunnel/__init__.py`` first: it must stay light."""
    assert _forbidden(_modules_after("")) == []


def test_public_names_load_on_first_use() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys, tunnel; light = 'grpclib.client' not in sys.modules; "
            "tunnel.TunnelChannel; tunnel.proxy.HOP_BY_HOP; "
            "missing = sorted(set(tunnel.__all__) - set(dir(tunnel))); "
            "print(light, 'grpclib.client' in sys.modules, missing)",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    assert done.stdout.split() == ["True", "True", "[]"]
