"""TLS contexts from the programs' PEM files; a bad file is a ``UsageError``.

Both ends offer ALPN ``h2`` only: gRPC runs on HTTP/2 and grpclib needs it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ._config import UsageError, readable_file

__all__ = ["client_context", "server_context"]


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path) -> None:
    readable_file(cert, "--tls-cert")
    readable_file(key, "--tls-key")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise UsageError(f"--tls-cert {cert} / --tls-key {key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: Path, flag: str) -> None:
    readable_file(ca, flag)
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:
        raise UsageError(f"{flag} {ca}: {exc}") from None


def server_context(
    cert: Path | None, key: Path | None, client_ca: Path | None
) -> ssl.SSLContext | None:
    """The router's context; with ``client_ca``, clients must show a certificate it signed."""
    if cert is None and key is None:
        if client_ca is not None:
            raise UsageError("--tls-client-ca needs --tls-cert and --tls-key")
        return None
    if cert is None or key is None:
        raise UsageError("--tls-cert and --tls-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, cert, key)
    if client_ca is not None:
        _load_ca(context, client_ca, "--tls-client-ca")
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def client_context(
    use_tls: bool, ca: Path | None, cert: Path | None, key: Path | None
) -> ssl.SSLContext | None:
    """The agent's context: the system's CAs, or ``ca``; a client certificate if given."""
    if not (use_tls or ca or cert or key):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        _load_ca(context, ca, "--tls-ca")
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise UsageError("--tls-cert and --tls-key go together")
        _load_chain(context, cert, key)
    context.set_alpn_protocols(["h2"])
    return context
