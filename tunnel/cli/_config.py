"""Settings of the programs: flags, a TOML file, defaults, in that order.

Each program declares its settings once, as ``Setting`` objects; from them
come the argparse flags (with their defaults in ``--help``), the keys a
config file may hold, and the checks both go through.  A flag given on the
command line wins over the file's value, which wins over the default.

The file uses the flag names as keys (``key-header = "x-device"``).  Keys
at the top level apply to every command; a table named after the command
(``[router]``, ``[agent]``) applies to that command only and wins over the
top level, so one file can configure both programs.  A key no setting has
is an error, as is a value of the wrong kind: a typo must not be ignored.

Every mistake is a ``UsageError`` with one line that names the flag or key;
the command prints it and exits with status 2.
"""

from __future__ import annotations

import argparse
import ipaddress
import math
import os
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

__all__ = [
    "Address",
    "Setting",
    "UsageError",
    "address",
    "choice",
    "flag",
    "load_settings",
    "path",
    "positive_int",
    "seconds",
    "text",
]


class UsageError(Exception):
    """A bad flag, file, value or address: one line for the user, exit status 2."""


@dataclass(frozen=True, slots=True)
class Address:
    """``HOST:PORT``; ``[v6]:PORT`` for IPv6 literals."""

    host: str
    port: int

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"


# -- value kinds: each takes a string (flag) or a TOML value, returns the setting ----


Parse = Callable[[Any], Any]


def _as_text(value: Any) -> str:
    if not isinstance(value, str):
        raise ValueError(f"expected a string, not {value!r}")
    return value


def text(value: Any) -> str:
    result = _as_text(value)
    if not result:
        raise ValueError("must not be empty")
    return result


def address(value: Any) -> Address:
    raw = _as_text(value)
    host, sep, port_text = raw.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{raw!r} is not HOST:PORT")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"{raw!r}: {host!r} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{raw!r}: write an IPv6 address in brackets, [{host}]:PORT")
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise ValueError(f"{raw!r}: the port must be a number from 0 to 65535")
    return Address(host, int(port_text))


def seconds(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected seconds, not {value!r}")
    try:
        result = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected seconds, not {value!r}") from None
    if not math.isfinite(result) or result < 0:
        raise ValueError(f"expected seconds (a number >= 0), not {value!r}")
    return result


def positive_int(value: Any) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a whole number, not {value!r}")
    try:
        result = int(value)
    except (TypeError, ValueError):
        raise ValueError(f"expected a whole number, not {value!r}") from None
    if result <= 0:
        raise ValueError(f"expected a number > 0, not {value!r}")
    return result


def path(value: Any) -> Path:
    return Path(text(value)).expanduser()


def choice(*choices: str) -> Parse:
    def parse(value: Any) -> str:
        result = _as_text(value)
        if result not in choices:
            raise ValueError(f"{result!r} is not one of {', '.join(choices)}")
        return result

    parse.choices = choices  # type: ignore[attr-defined]  # shown in --help
    return parse


def flag(value: Any) -> bool:
    if not isinstance(value, bool):
        raise ValueError(f"expected true or false, not {value!r}")
    return value


# -- settings ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Setting:
    """One setting: a flag ``--name`` and a config key ``name``."""

    name: str
    parse: Parse
    default: Any
    help: str
    metavar: str | None = None
    #: The flag may be given several times (a list in the file).
    repeat: bool = False
    #: Must end up with a value, from the flag or the file.
    required: bool = False

    @property
    def dest(self) -> str:
        return self.name.replace("-", "_")

    def add_to(self, parser: argparse.ArgumentParser) -> None:
        shown = self.default
        if self.parse is flag:
            default = "on" if shown else "off"
            parser.add_argument(
                f"--{self.name}",
                dest=self.dest,
                action=argparse.BooleanOptionalAction,
                default=None,
                help=f"{self.help} (default: {default})",
            )
            return
        if self.required:
            suffix = " (required)"
        elif shown is None or shown == []:
            suffix = ""
        else:
            suffix = f" (default: {_show(shown)})"
        choices = getattr(self.parse, "choices", None)
        metavar = self.metavar or ("|".join(choices) if choices else self.name.upper())
        parser.add_argument(
            f"--{self.name}",
            dest=self.dest,
            action="append" if self.repeat else "store",
            default=None,
            metavar=metavar,
            help=self.help + suffix,
        )


def _show(value: Any) -> str:
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


class ArgumentParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line and exit status 2."""

    def error(self, message: str) -> NoReturn:
        raise UsageError(message)


def _parse_value(setting: Setting, value: Any, where: str) -> Any:
    try:
        if setting.repeat:
            values = value if isinstance(value, list) else [value]
            return [setting.parse(v) for v in values]
        return setting.parse(value)
    except ValueError as exc:
        raise UsageError(f"{where}: {exc}") from None


def read_toml(file: Path) -> dict[str, Any]:
    try:
        with file.open("rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise UsageError(f"{file}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{file}: cannot read it: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise UsageError(f"{file}: not valid TOML: {exc}") from None


def _from_file(
    file: Path, command: str, settings: Mapping[str, Setting], others: Sequence[str]
) -> dict[str, Any]:
    """The settings ``file`` gives ``command``: its top level, then its table."""
    document = read_toml(file)
    values: dict[str, Any] = {}
    section = document.get(command, {})
    if not isinstance(section, dict):
        raise UsageError(f"{file}: [{command}] must be a table")
    for scope, table in (("", document), (f"[{command}] ", section)):
        for key, value in table.items():
            if scope == "" and key in (command, *others) and isinstance(value, dict):
                continue  # a command's table
            setting = settings.get(key)
            if setting is None or key == "config":
                raise UsageError(f"{file}: {scope}{key!r} is not a setting of {command}")
            values[key] = _parse_value(setting, value, f"{file}: {scope}{key}")
    return values


def load_settings(
    parser: ArgumentParser,
    settings: Sequence[Setting],
    argv: Sequence[str],
    *,
    command: str,
    others: Sequence[str] = (),
) -> dict[str, Any]:
    """Flags over the ``--config`` file over the defaults, checked; by ``dest``."""
    namespace = parser.parse_args(argv)
    by_name = {setting.name: setting for setting in settings}
    values: dict[str, Any] = {s.dest: s.default for s in settings}
    config = getattr(namespace, "config", None)
    if config is not None:
        file = path(config)
        for name, value in _from_file(file, command, by_name, others).items():
            values[by_name[name].dest] = value
    for setting in settings:
        given = getattr(namespace, setting.dest, None)
        if given is not None:
            values[setting.dest] = _parse_value(setting, given, f"--{setting.name}")
    for setting in settings:
        if setting.required and values[setting.dest] in (None, []):
            raise UsageError(f"--{setting.name} is required (a flag or a key in --config)")
    return values


def read_secret(file: Path | None, env: str, what: str) -> str | None:
    """A secret from ``file`` (first line, stripped) or else the environment.

    Secrets never come from the command line: a command line is visible to
    every user of the machine (``ps``) and lands in shell histories.
    """
    if file is not None:
        try:
            secret = file.read_text().strip()
        except FileNotFoundError:
            raise UsageError(f"{what} {file}: no such file") from None
        except (OSError, UnicodeDecodeError) as exc:
            raise UsageError(f"{what} {file}: cannot read it: {exc}") from None
        if not secret:
            raise UsageError(f"{what} {file} is empty")
        return secret
    secret = os.environ.get(env, "").strip()
    return secret or None


def readable_file(file: Path | None, what: str) -> Path | None:
    """``file`` if it can be read (checked at start, not at first use)."""
    if file is None:
        return None
    try:
        with file.open("rb"):
            pass
    except FileNotFoundError:
        raise UsageError(f"{what} {file}: no such file") from None
    except OSError as exc:
        raise UsageError(f"{what} {file}: cannot read it: {exc.strerror or exc}") from None
    return file
