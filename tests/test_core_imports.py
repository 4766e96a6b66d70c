"""The import layering of ``tunnel/``, pinned: the core stays sans-IO, extras stay extra.

Layers, lowest first (:data:`LAYERS`):

=========  ===============================  ==========================================
frames     ``tunnel._pb``                   the generated grpctunnel.v1 frame classes
errors     ``tunnel.errors``                who is at fault, how far the damage goes
core       ``tunnel._core``                 the sans-IO protocol: frames in, events out
library    the other modules of ``tunnel``  the asyncio layer on grpclib
front      ``tunnel`` itself                the public names, loaded on first use
testing    ``tunnel.testing``               test service and programs (``testing`` extra)
trio       ``tunnel.trio``                  tunnels for trio programs (``trio`` extra)
programs   ``tunnel.cli``, ``tunnel.demo``  router, agent, demos (``router`` extra)
=========  ===============================  ==========================================

The rules, checked on the import statements of every module (read with
``ast``, so imports inside functions and under ``TYPE_CHECKING`` count):

1. A module imports from its own layer and the layers its row names, never
   from one above.  The three tops sit side by side on the library; only the
   programs use ``tunnel.testing`` (the demos run its backend).  So the core
   never reaches the asyncio layer, and the library never ``tunnel.cli``,
   ``tunnel.trio`` or ``tunnel.testing``.
2. Beyond the standard library a layer imports only the packages its row
   names: the library its run-time dependencies (grpclib, with the multidict
   and h2 it brings, hyperframe and protobuf), each extra's layer that extra
   as well.
   The core takes only grpclib's pure modules (``const``, ``metadata``,
   ``exceptions``) and none of the standard library's I/O: a driver for
   another event loop must be able to sit on ``tunnel._core`` alone.
3. Nothing below the public modules imports them: the asyncio layer's
   private modules (``tunnel/_*.py``) do not import the public modules users
   open and serve tunnels with (:data:`ENTRY_MODULES`).  They may use the
   public modules that define what they work with (:data:`DEFINITIONS`):
   settings, ``TunnelChannel`` (pools hold them, callbacks receive them),
   the fallback protocol, raw messages.  Every public module of the library
   is in one of the two lists.

What must stay lazy is checked in a fresh interpreter (imports by other
tests cannot hide one there): ``import tunnel`` loads nothing of the
package (``tunnel/__init__.py`` loads each public name on first use),
``import tunnel._core`` no asyncio and no grpclib I/O, the whole public
library none of the extras, and ``import tunnel.cli`` (what ``--help``
needs) neither grpclib's I/O nor the ``router`` extra.
"""

from __future__ import annotations

import ast
import fnmatch
import importlib.util
import json
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "tunnel"

#: The library's run-time dependencies (pyproject's ``dependencies``: grpclib,
#: protobuf, hyperframe, for h2's frame classes that only ``_seam`` reads),
#: with the two packages grpclib itself brings and whose names its API uses.
RUNTIME = ("grpclib", "multidict", "h2", "hyperframe", "google.protobuf", "google.rpc")

#: The standard library's I/O, which the sans-IO core leaves to its driver.
STDLIB_IO = (
    "asyncio",
    "socket",
    "ssl",
    "selectors",
    "select",
    "threading",
    "subprocess",
    "concurrent",
    "multiprocessing",
)

#: What each extra brings; the library itself loads none of them.
EXTRAS = {
    "testing": ("betterproto",),
    "trio": ("trio", "trio_asyncio", "sniffio"),
    "router": ("aiohttp", "prometheus_client", "redis"),
}

#: grpclib's modules that do network or event-loop work.
GRPCLIB_IO = ("grpclib.client", "grpclib.server", "grpclib.protocol")


@dataclass(frozen=True)
class Layer:
    #: Module name patterns (fnmatch); a module is in the layer whose
    #: matching pattern is the longest.
    modules: tuple[str, ...]
    #: The other layers it may import from (its own is always allowed).
    uses: tuple[str, ...]
    #: Non-standard-library modules it may import (these and their submodules).
    packages: tuple[str, ...]
    #: Standard-library modules it must not import.
    not_stdlib: tuple[str, ...] = ()


LAYERS: dict[str, Layer] = {
    "frames": Layer(("tunnel._pb", "tunnel._pb.*"), (), ("google.protobuf", "google.rpc")),
    "errors": Layer(("tunnel.errors",), (), ("grpclib.const", "grpclib.exceptions")),
    "core": Layer(
        ("tunnel._core", "tunnel._core.*"),
        ("frames", "errors"),
        (
            "google.protobuf",
            "google.rpc",
            "grpclib.const",
            "grpclib.metadata",
            "grpclib.exceptions",
        ),
        not_stdlib=STDLIB_IO,
    ),
    "library": Layer(("tunnel.*",), ("frames", "errors", "core"), RUNTIME),
    "front": Layer(("tunnel",), ("frames", "errors", "core", "library"), RUNTIME),
    "testing": Layer(
        ("tunnel.testing", "tunnel.testing.*"),
        ("frames", "errors", "core", "library", "front"),
        RUNTIME + EXTRAS["testing"],
    ),
    "trio": Layer(
        ("tunnel.trio", "tunnel.trio.*"),
        ("frames", "errors", "core", "library", "front"),
        RUNTIME + EXTRAS["trio"],
    ),
    "programs": Layer(
        ("tunnel.cli", "tunnel.cli.*", "tunnel.demo", "tunnel.__main__"),
        ("frames", "errors", "core", "library", "front", "testing"),
        RUNTIME + EXTRAS["router"] + EXTRAS["testing"],
    ),
}

#: The public modules users open and serve tunnels with (rule 3).
ENTRY_MODULES = ("tunnel.handler", "tunnel.reverse", "tunnel.device", "tunnel.proxy")
#: The public modules that define what the private ones work with (rule 3).
DEFINITIONS = ("tunnel.channel", "tunnel.options", "tunnel.fallback", "tunnel.raw")


# -- reading the import statements ------------------------------------------------------


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


#: Every module of the package, by name.
MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _is_module(name: str) -> bool:
    """Whether *name* is a module (not a name in one), found on disk without importing it."""
    top, _, rest = name.partition(".")
    if top == "tunnel":
        return name in MODULES
    spec = importlib.util.find_spec(top)  # a top-level lookup imports nothing
    if spec is None or not rest:
        return spec is not None
    for location in spec.submodule_search_locations or ():
        path = Path(location).joinpath(*rest.split("."))
        if path.with_suffix(".py").is_file() or path.is_dir():
            return True
        if any(path.parent.glob(f"{path.name}.*.so")):  # an extension module
            return True
    return False


def imports(name: str, source: str, *, package: bool) -> Iterator[tuple[int, str]]:
    """(line, module) of each import in *source*, the source of module *name*.

    ``from X import y`` counts as importing ``X.y`` when that is a module,
    else ``X``; relative imports are resolved against *name*.
    """
    here = name if package else name.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = here.split(".")
                parent = ".".join(parts[: len(parts) - node.level + 1])
                base = f"{parent}.{base}" if base else parent
            for alias in node.names:
                candidate = f"{base}.{alias.name}"
                yield node.lineno, candidate if _is_module(candidate) else base


def _within(module: str, prefixes: tuple[str, ...]) -> bool:
    return any(module == p or module.startswith(p + ".") for p in prefixes)


def layer_of(module: str) -> str:
    matches = [
        (len(pattern), layer)
        for layer, spec in LAYERS.items()
        for pattern in spec.modules
        if fnmatch.fnmatchcase(module, pattern)
    ]
    assert matches, f"{module} is in no layer"
    return max(matches)[1]


def violations(name: str, source: str, *, package: bool = False) -> list[str]:
    """What in *source* (module *name*) breaks the rules, one line per import."""
    layer = layer_of(name)
    spec = LAYERS[layer]
    private = name.count(".") == 1 and name.rpartition(".")[2].startswith("_")
    found = []
    for line, imported in dict.fromkeys(imports(name, source, package=package)):
        top = imported.split(".")[0]
        where = f"{name}:{line} imports {imported}"
        if top == "tunnel":
            theirs = layer_of(imported)
            if theirs != layer and theirs not in spec.uses:
                found.append(f"{where} ({layer} layer may not use the {theirs} layer)")
            elif layer == "library" and private and imported in ENTRY_MODULES:
                found.append(f"{where} (a private module imports a public entry module)")
        elif top in sys.stdlib_module_names:
            if _within(imported, spec.not_stdlib):
                found.append(f"{where} (the {layer} layer does no I/O)")
        elif not _within(imported, spec.packages):
            found.append(f"{where} (not a dependency of the {layer} layer)")
    return found


def _source(name: str) -> tuple[str, bool]:
    path = MODULES[name]
    return path.read_text(encoding="utf-8"), path.name == "__init__.py"


# -- the rules, over every module -------------------------------------------------------


def test_every_module_keeps_to_its_layer() -> None:
    found = []
    for name in MODULES:
        source, package = _source(name)
        found += violations(name, source, package=package)
    assert found == []


def test_every_public_module_of_the_library_is_an_entry_or_a_definition() -> None:
    """A new public module is placed in one of the two lists, so rule 3 covers it."""
    public = {name for name in MODULES if layer_of(name) == "library" and "._" not in name}
    assert public == {*ENTRY_MODULES, *DEFINITIONS}


def test_every_layer_has_modules() -> None:
    """A layer whose patterns match nothing (a package renamed, say) checks nothing."""
    assert {layer_of(name) for name in MODULES} == set(LAYERS)


@pytest.mark.parametrize(
    ("name", "source", "reason"),
    [
        ("tunnel._core.x", "import asyncio", "does no I/O"),
        ("tunnel._core.x", "from grpclib.protocol import Peer", "not a dependency"),
        ("tunnel._core.x", "from grpclib import client", "not a dependency"),
        ("tunnel._core.x", "from .. import channel", "may not use the library layer"),
        ("tunnel._core.x", "from tunnel import _tunnel", "may not use the library layer"),
        ("tunnel.errors", "from ._core import flow", "may not use the core layer"),
        ("tunnel.channel", "from .cli import main", "may not use the programs layer"),
        ("tunnel.channel", "import tunnel.trio", "may not use the trio layer"),
        ("tunnel.channel", "from tunnel.testing import TestService", "may not use the testing"),
        ("tunnel.channel", "import tunnel", "may not use the front layer"),
        ("tunnel.proxy", "import aiohttp", "not a dependency of the library"),
        ("tunnel._driver", "from . import handler", "a private module imports a public entry"),
        ("tunnel._pools", "from .device import X", "a private module imports a public entry"),
        ("tunnel.trio._x", "from ..cli import router", "may not use the programs layer"),
        ("tunnel.testing.x", "import trio", "not a dependency of the testing layer"),
        ("tunnel.cli.x", "from ..trio import open_tunnel", "may not use the trio layer"),
    ],
)
def test_the_rules_catch_a_bad_import(name: str, source: str, reason: str) -> None:
    (found,) = violations(name, source)
    assert reason in found


def test_the_rules_let_the_layers_use_what_they_may() -> None:
    allowed = {
        "tunnel._core.x": "from ..errors import RemoteProtocolError\nfrom .._pb import tunnel_pb2",
        "tunnel.channel": "import asyncio\nfrom ._core import client\nfrom .reverse import x",
        "tunnel._pools": "from .channel import TunnelChannel\nfrom .options import TunnelOptions",
        "tunnel.trio._x": "import trio\nfrom .. import channel",
        "tunnel.cli.x": "import aiohttp\nimport tunnel\nfrom ..testing import backend",
    }
    for name, source in allowed.items():
        assert violations(name, source) == [], name


# -- what stays lazy, in a fresh interpreter --------------------------------------------

#: Imports ``tunnel._core`` without running ``tunnel/__init__.py``: the
#: package object is made by hand, so only the core's own imports run.
CORE_ONLY = """
import sys, types
package = types.ModuleType("tunnel")
package.__path__ = [{path!r}]
sys.modules["tunnel"] = package
"""


def _loaded_by(statements: str, prelude: str = "") -> set[str]:
    """The modules that *statements* load, run in a fresh interpreter after *prelude*."""
    program = (
        f"import json, sys\n{prelude}\nbefore = set(sys.modules)\n{statements}\n"
        "print(json.dumps(sorted(set(sys.modules) - before)))\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", program],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        check=True,
    )
    modules: list[str] = json.loads(done.stdout)
    return set(modules)


def _among(modules: set[str], names: tuple[str, ...]) -> list[str]:
    return sorted(m for m in modules if _within(m, names))


def test_the_core_modules_import_no_event_loop_or_grpclib_io() -> None:
    modules = _loaded_by("import tunnel._core", CORE_ONLY.format(path=str(PACKAGE)))
    assert "tunnel._core.client" in modules  # the core really was imported
    assert _among(modules, ("asyncio", *GRPCLIB_IO)) == []


def test_importing_tunnel_core_imports_no_event_loop_or_grpclib_io() -> None:
    """``import tunnel._core`` runs ``tunnel/__init__.py`` first: it must stay light."""
    modules = _loaded_by("import tunnel._core")
    assert "tunnel._core.client" in modules
    assert _among(modules, ("asyncio", *GRPCLIB_IO)) == []


def test_import_tunnel_alone_loads_nothing_of_the_package() -> None:
    modules = _loaded_by("import tunnel")
    assert "tunnel" in modules
    assert _among(modules - {"tunnel"}, ("tunnel", "asyncio", "grpclib")) == []


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


def test_the_whole_library_loads_no_extra_and_no_top() -> None:
    public = [name for name in MODULES if layer_of(name) == "library" and "._" not in name]
    modules = _loaded_by("from tunnel import *\n" + "".join(f"import {name}\n" for name in public))
    assert set(public) <= modules
    extras = tuple(package for packages in EXTRAS.values() for package in packages)
    tops = ("tunnel.testing", "tunnel.trio", "tunnel.cli", "tunnel.demo")
    assert _among(modules, extras + tops) == []


def test_the_programs_help_needs_no_extra_and_no_grpclib_io() -> None:
    """``grpctunnel --help`` and usage errors work without the router extra (tunnel.cli)."""
    modules = _loaded_by("import tunnel.cli")
    assert "tunnel.cli" in modules
    assert _among(modules, EXTRAS["router"] + GRPCLIB_IO) == []
