"""``grpctunnel``: the router and the agent, for devices behind NAT.

``grpctunnel router`` accepts agents' reverse tunnels and forwards every
other call to the agent its caller names by key; ``grpctunnel agent`` runs
next to a backend, registers with routers and forwards their calls to it;
``grpctunnel hash-token FILE`` prints the SHA-256 the router's tokens file
holds for the token in FILE.  See docs/operators.md.

The programs need the ``router`` extra (prometheus-client, aiohttp, redis); the
library (``import tunnel``) never imports this package.  ``--help`` and
usage errors work without the extra; running a program without it says
what to install, in one line, with exit status 2.
"""

from __future__ import annotations

import asyncio
import sys
from collections.abc import Sequence

from .. import __version__
from ._config import ArgumentParser, Setting, UsageError, load_settings, readable_file
from ._settings import AGENT, ROUTER, check_cluster
from ._tokens import hash_token

__all__ = ["main"]

PROGRAM = "grpctunnel"
EXTRA_HINT = "pip install 'grpclib-tunnel[router]'"

_DESCRIPTIONS = {
    "router": "Accept agents' reverse tunnels; forward every other call to the agent named by key.",
    "agent": "Register with routers; forward the calls they send to a backend.",
    "hash-token": "Print the SHA-256 of the token in FILE, for the router's --agent-tokens file.",
}


def _parser() -> tuple[ArgumentParser, dict[str, ArgumentParser]]:
    parser = ArgumentParser(
        prog=PROGRAM,
        description=__doc__.split("\n\n")[0] if __doc__ else None,
        allow_abbrev=False,
    )
    parser.add_argument("--version", action="version", version=f"{PROGRAM} {__version__}")
    commands = parser.add_subparsers(dest="command", metavar="{router,agent,hash-token}")
    subparsers: dict[str, ArgumentParser] = {}
    for name, settings in (("router", ROUTER), ("agent", AGENT), ("hash-token", None)):
        sub = commands.add_parser(
            name, help=_DESCRIPTIONS[name], description=_DESCRIPTIONS[name], allow_abbrev=False
        )
        assert isinstance(sub, ArgumentParser)
        if settings is None:
            sub.add_argument("file", metavar="FILE", help="the file holding the token ('-': stdin)")
        else:
            for setting in settings:
                setting.add_to(sub)
        subparsers[name] = sub
    return parser, subparsers


def _run(command: str, settings: list[Setting], argv: Sequence[str], parser: ArgumentParser) -> int:
    others = [c for c in ("router", "agent") if c != command]
    values = load_settings(parser, settings, argv, command=command, others=others)
    if command == "router":
        check_cluster(values)
    try:
        if command == "router":
            from . import router as program
        else:
            from . import agent as program  # type: ignore[no-redef]
    except ModuleNotFoundError as exc:
        if exc.name in ("prometheus_client", "aiohttp", "redis"):
            raise UsageError(
                f"{command} needs the 'router' extra ({exc.name}): {EXTRA_HINT}"
            ) from None
        raise
    try:
        return asyncio.run(program.run(values))
    except KeyboardInterrupt:  # a second Ctrl-C during shutdown
        return 130


def _hash_token(file: str) -> int:
    if file == "-":
        token = sys.stdin.readline().strip()
    else:
        from pathlib import Path

        path = readable_file(Path(file), "hash-token")
        assert path is not None
        token = path.read_text().strip()
    if not token:
        raise UsageError(f"hash-token {file}: no token in it")
    print(hash_token(token))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """The ``grpctunnel`` command; returns the exit status."""
    args = list(sys.argv[1:] if argv is None else argv)
    parser, subparsers = _parser()
    try:
        if not args or args[0] not in subparsers:
            parser.parse_args(args)  # --help, --version, or a usage error
            parser.print_help()
            return 2
        command, rest = args[0], args[1:]
        if command == "hash-token":
            return _hash_token(subparsers[command].parse_args(rest).file)
        settings = ROUTER if command == "router" else AGENT
        return _run(command, settings, rest, subparsers[command])
    except UsageError as exc:
        command = args[0] if args and args[0] in subparsers else ""
        print(f"{PROGRAM} {command}: error: {exc}".replace("  ", " "), file=sys.stderr)
        return 2
