"""Every setting of ``grpctunnel router`` and ``grpctunnel agent``, declared once.

The flags, their ``--help`` (with defaults) and the keys of the config
file all come from these lists (see ``_config``).  Nothing here imports the
``router`` extra, so ``--help`` and usage errors work without it.
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import urlsplit

from ..options import TunnelOptions
from ._config import Setting, UsageError, address, choice, flag, path, positive_int, seconds, text

__all__ = [
    "AGENT",
    "AGENT_INSTANCE_HEADER",
    "AGENT_KEY_HEADER",
    "PEER_SECRET_ENV",
    "REGISTRY_PASSWORD_ENV",
    "ROUTER",
    "check_cluster",
    "describe_url",
    "tunnel_options",
]

#: ``grpctunnel-agent-key``: the key an agent registers under (request header
#: of OpenReverseTunnel).
AGENT_KEY_HEADER = "grpctunnel-agent-key"
#: ``grpctunnel-agent-instance``: a random id per agent process, so the
#: router tells a reconnect of the same agent from another agent.
AGENT_INSTANCE_HEADER = "grpctunnel-agent-instance"

#: The registry's password, if it needs one (never on the command line).
REGISTRY_PASSWORD_ENV = "GRPCTUNNEL_REGISTRY_PASSWORD"
#: The peers' shared secret, when no --peer-secret-file is given.
PEER_SECRET_ENV = "GRPCTUNNEL_PEER_SECRET"

_HEADER = re.compile(r"[0-9a-z_.-]+")


def header_name(value: Any) -> str:
    name = text(value)
    if not _HEADER.fullmatch(name) or name.endswith("-bin") or name.startswith("grpc-"):
        raise ValueError(
            f"{name!r} is not a usable header name (lower case letters, digits, '-', '_', "
            "'.'; not grpc-*, not *-bin)"
        )
    return name


def describe_url(url: str) -> str:
    """A registry URL without credentials, for logs and messages."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    try:
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        port = ""
    return f"{parts.scheme}://{host}{port}{parts.path}"


def registry_url(value: Any) -> str:
    """``redis://HOST:PORT/DB`` (or ``rediss://``, TLS); no password in it."""
    url = text(value)
    parts = urlsplit(url)
    if parts.scheme not in ("redis", "rediss"):
        raise ValueError(f"{url!r} is not a redis:// or rediss:// URL")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"{url!r}: the port must be a number from 0 to 65535") from None
    if not parts.hostname or port is None:
        raise ValueError(f"{url!r}: say which host and port (redis://HOST:PORT/DB)")
    if parts.password is not None or parts.username is not None:
        raise ValueError(
            f"{describe_url(url)}: no credentials in the URL (it shows in ps); "
            f"put the password in ${REGISTRY_PASSWORD_ENV}"
        )
    db = parts.path.strip("/")
    if db and not db.isdigit():
        raise ValueError(f"{url!r}: the database is a number (redis://HOST:PORT/DB)")
    if parts.query or parts.fragment:
        raise ValueError(f"{url!r}: no query or fragment")
    return url


def positive_seconds(value: Any) -> float:
    result = seconds(value)
    if result <= 0:
        raise ValueError(f"expected seconds > 0, not {value!r}")
    return result


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
    # Replicas sharing a registry (docs/operators.md, "Several routers").
    Setting(
        "registry",
        registry_url,
        None,
        "share the keys with other routers through this Redis (redis://HOST:PORT/DB); "
        f"its password, if any, in ${REGISTRY_PASSWORD_ENV}",
        "URL",
    ),
    Setting("router-id", key, None, "this router's name among the replicas (unique)", "ID"),
    Setting(
        "peer-listen",
        address,
        None,
        "serve calls forwarded by the other routers here",
        "HOST:PORT",
    ),
    Setting(
        "advertise",
        address,
        None,
        "the address the other routers dial for --peer-listen (default: its own, "
        "if its host is not a wildcard; port 0: the port --peer-listen got)",
        "HOST:PORT",
    ),
    Setting(
        "peer-secret-file",
        path,
        None,
        f"file holding the secret the routers share (else ${PEER_SECRET_ENV})",
        "FILE",
    ),
    Setting(
        "peer-tls-cert",
        path,
        None,
        "mutual TLS between routers: this router's certificate chain (PEM), "
        "served on --peer-listen and shown to the peers it dials",
        "FILE",
    ),
    Setting("peer-tls-key", path, None, "the private key of --peer-tls-cert (PEM)", "FILE"),
    Setting(
        "peer-tls-ca",
        path,
        None,
        "the CAs (PEM) that sign the routers' --peer-tls-cert",
        "FILE",
    ),
    Setting(
        "registry-ttl",
        positive_seconds,
        30.0,
        "a router's entries expire this long after its last refresh (refreshed every third)",
        "SECONDS",
    ),
]

#: The settings that only mean something with --registry.
CLUSTER_SETTINGS = (
    "router_id",
    "peer_listen",
    "advertise",
    "peer_secret_file",
    "peer_tls_cert",
    "peer_tls_key",
    "peer_tls_ca",
)


def check_cluster(settings: dict[str, Any]) -> None:
    """The replica settings go together; a ``UsageError`` says what is missing."""
    if settings["registry"] is None:
        given = [name for name in CLUSTER_SETTINGS if settings[name] is not None]
        if given:
            flag = "--" + given[0].replace("_", "-")
            raise UsageError(f"{flag} needs --registry")
        return
    for name in ("router_id", "peer_listen"):
        if settings[name] is None:
            flag = "--" + name.replace("_", "-")
            raise UsageError(f"--registry needs {flag}")
    tls = [settings[n] is not None for n in ("peer_tls_cert", "peer_tls_key", "peer_tls_ca")]
    if any(tls) and not all(tls):
        raise UsageError("--peer-tls-cert, --peer-tls-key and --peer-tls-ca go together")


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
