"""Every setting of ``grpctunnel router`` and ``grpctunnel agent``, declared once.

The flags, their ``--help`` (with defaults) and the keys of the config
file all come from these lists (see ``_config``).  Nothing here imports the
``router`` extra, so ``--help`` and usage errors work without it.
"""

from __future__ import annotations

import re
from typing import Any

from ..options import TunnelOptions
from ._config import Setting, UsageError, address, choice, flag, path, positive_int, seconds, text

__all__ = ["AGENT", "AGENT_INSTANCE_HEADER", "AGENT_KEY_HEADER", "ROUTER", "tunnel_options"]

#: ``grpctunnel-agent-key``: the key an agent registers under (request header
#: of OpenReverseTunnel).
AGENT_KEY_HEADER = "grpctunnel-agent-key"
#: ``grpctunnel-agent-instance``: a random id per agent process, so the
#: router tells a reconnect of the same agent from another agent.
AGENT_INSTANCE_HEADER = "grpctunnel-agent-instance"

_HEADER = re.compile(r"[0-9a-z_.-]+")


def header_name(value: Any) -> str:
    name = text(value)
    if not _HEADER.fullmatch(name) or name.endswith("-bin") or name.startswith("grpc-"):
        raise ValueError(
            f"{name!r} is not a usable header name (lower case letters, digits, '-', '_', "
            "'.'; not grpc-*, not *-bin)"
        )
    return name


def key(value: Any) -> str:
    result = text(value)
    if not result.isprintable() or result != result.strip():
        raise ValueError(f"{result!r}: a key is printable text without surrounding spaces")
    return result


_LOGGING = [
    Setting("log-format", choice("text", "json"), "text", "text for people, json for machines"),
    Setting(
        "log-level",
        choice("debug", "info", "warning", "error"),
        "info",
        "the least severe level logged",
    ),
]

_TUNNEL = [
    Setting(
        "keepalive-interval",
        seconds,
        30.0,
        "seconds of a tunnel's silence before checking that its peer is alive (0: never)",
        "SECONDS",
    ),
    Setting(
        "keepalive-timeout",
        seconds,
        20.0,
        "seconds the peer has to answer that check before its tunnel is dropped",
        "SECONDS",
    ),
    Setting(
        "max-message-size",
        positive_int,
        4 * 1024 * 1024,
        "the largest message, in bytes, a tunnel accepts from its peer",
        "BYTES",
    ),
]

_ADMIN = Setting(
    "admin",
    address,
    None,
    "serve /healthz, /readyz, /metrics and /tunnels over HTTP here",
    "HOST:PORT",
)

_CONFIG = Setting("config", path, None, "read settings from this TOML file (flags win)", "FILE")

ROUTER = [
    _CONFIG,
    Setting(
        "listen",
        address,
        None,
        "serve agents and callers on this address (port 0: any free port)",
        "HOST:PORT",
        required=True,
    ),
    _ADMIN,
    Setting(
        "key-header",
        header_name,
        "tunnel-key",
        "the request header whose value names the agent a call goes to",
        "NAME",
    ),
    Setting(
        "agent-tokens",
        path,
        None,
        "TOML file of token SHA-256 -> key patterns agents may register; "
        "without it any agent may register any key",
        "FILE",
    ),
    Setting(
        "on-duplicate",
        choice("replace", "allow", "reject"),
        "replace",
        "a second agent under a key: takes over (replace), shares the calls round-robin "
        "(allow), or is refused with ALREADY_EXISTS (reject)",
    ),
    Setting(
        "wait-for-tunnel",
        seconds,
        0.0,
        "how long a call for a key with no agent waits for one, within its deadline",
        "SECONDS",
    ),
    Setting(
        "grace-period",
        seconds,
        10.0,
        "on SIGTERM/SIGINT, and for a replaced tunnel: how long calls in flight may take",
        "SECONDS",
    ),
    Setting(
        "forward-authorization",
        flag,
        False,
        "forward the callers' authorization header to the agents",
    ),
    Setting("tls-cert", path, None, "serve TLS with this certificate chain (PEM)", "FILE"),
    Setting("tls-key", path, None, "the private key of --tls-cert (PEM)", "FILE"),
    Setting(
        "tls-client-ca",
        path,
        None,
        "require client certificates signed by these CAs (PEM)",
        "FILE",
    ),
    *_TUNNEL,
    *_LOGGING,
]

AGENT = [
    _CONFIG,
    Setting(
        "router",
        address,
        [],
        "a router to register with (repeat the flag to register with several)",
        "HOST:PORT",
        repeat=True,
        required=True,
    ),
    Setting(
        "backend",
        address,
        None,
        "the gRPC server calls are forwarded to",
        "HOST:PORT",
        required=True,
    ),
    Setting("key", key, None, "the key to register under", "KEY", required=True),
    Setting(
        "token-file",
        path,
        None,
        "file holding the agent's token (else $GRPCTUNNEL_TOKEN; sent as a bearer token)",
        "FILE",
    ),
    Setting("tls", flag, False, "dial the routers over TLS, verified with the system's CAs"),
    Setting(
        "tls-ca", path, None, "dial the routers over TLS, verified with these CAs (PEM)", "FILE"
    ),
    Setting("tls-cert", path, None, "a client certificate chain to show the routers (PEM)", "FILE"),
    Setting("tls-key", path, None, "the private key of --tls-cert (PEM)", "FILE"),
    Setting(
        "allow-method",
        text,
        [],
        "forward only methods matching this glob (/pkg.Service/*; repeatable); "
        "others get PERMISSION_DENIED",
        "PATTERN",
        repeat=True,
    ),
    Setting("min-backoff", seconds, 0.5, "the first delay before reconnecting", "SECONDS"),
    Setting("max-backoff", seconds, 30.0, "the longest delay before reconnecting", "SECONDS"),
    _ADMIN,
    Setting(
        "grace-period",
        seconds,
        10.0,
        "on SIGTERM/SIGINT: how long calls in flight may take to finish",
        "SECONDS",
    ),
    Setting(
        "max-concurrent-streams",
        positive_int,
        100,
        "the most calls one router may run through this agent at once",
        "N",
    ),
    *_TUNNEL,
    *_LOGGING,
]


def tunnel_options(settings: dict[str, Any], **more: Any) -> TunnelOptions:
    """The ``TunnelOptions`` the settings ask for (keepalive interval 0: off)."""
    try:
        return TunnelOptions(
            keepalive_interval=settings["keepalive_interval"] or None,
            keepalive_timeout=settings["keepalive_timeout"],
            max_receive_message_length=settings["max_message_size"],
            **more,
        )
    except ValueError as exc:
        raise UsageError(str(exc).replace("_", "-")) from None
