"""TLS contexts from the programs' PEM files; a bad file is a ``UsageError``.

Both ends offer ALPN ``h2`` only: gRPC runs on HTTP/2 and grpclib needs it.
"""

from __future__ import annotations

import ssl
from pathlib import Path

from ._config import UsageError, readable_file

__all__ = ["client_context", "server_context"]


def _load_chain(context: ssl.SSLContext, cert: Path, key: Path, flags: str) -> None:
    readable_file(cert, f"{flags}-cert")
    readable_file(key, f"{flags}-key")
    try:
        context.load_cert_chain(cert, key)
    except (ssl.SSLError, ValueError) as exc:
        raise UsageError(f"{flags}-cert {cert} / {flags}-key {key}: {exc}") from None


def _load_ca(context: ssl.SSLContext, ca: Path, flag: str) -> None:
    readable_file(ca, flag)
    try:
        context.load_verify_locations(cafile=ca)
    except (ssl.SSLError, ValueError) as exc:
        raise UsageError(f"{flag} {ca}: {exc}") from None


def server_context(
    cert: Path | None, key: Path | None, client_ca: Path | None, *, flags: str = "--tls"
) -> ssl.SSLContext | None:
    """The router's context; with ``client_ca``, clients must show a certificate it signed.

    ``flags`` is how the settings are named in messages (``--tls``: ``--tls-cert``,
    ``--tls-key``, ``--tls-client-ca``; ``--peer-tls``: ``--peer-tls-ca`` for the CA).
    """
    ca_flag = f"{flags}-client-ca" if flags == "--tls" else f"{flags}-ca"
    if cert is None and key is None:
        if client_ca is not None:
            raise UsageError(f"{ca_flag} needs {flags}-cert and {flags}-key")
        return None
    if cert is None or key is None:
        raise UsageError(f"{flags}-cert and {flags}-key go together")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    _load_chain(context, cert, key, flags)
    if client_ca is not None:
        _load_ca(context, client_ca, ca_flag)
        context.verify_mode = ssl.CERT_REQUIRED
    context.set_alpn_protocols(["h2"])
    return context


def client_context(
    use_tls: bool, ca: Path | None, cert: Path | None, key: Path | None, *, flags: str = "--tls"
) -> ssl.SSLContext | None:
    """The agent's context (and a router's to its peers): the system's CAs, or ``ca``;
    a client certificate if given."""
    if not (use_tls or ca or cert or key):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if ca is not None:
        _load_ca(context, ca, f"{flags}-ca")
    if cert is not None or key is not None:
        if cert is None or key is None:
            raise UsageError(f"{flags}-cert and {flags}-key go together")
        _load_chain(context, cert, key, flags)
    context.set_alpn_protocols(["h2"])
    return context
