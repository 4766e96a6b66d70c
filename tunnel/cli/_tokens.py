"""The router's agent tokens file: which token may register which keys.

The file holds no token, only each token's SHA-256 (hex), so a copy of it
(a backup, a config repository) lets nobody register as an agent::

    # grpctunnel agent tokens
    [[agents]]
    name = "kitchen devices"          # optional; shown in logs instead of the token
    token-sha256 = "5e884898da28..."  # `grpctunnel hash-token FILE` prints it
    keys = ["kitchen", "kitchen-*"]   # glob patterns (fnmatch: *, ?, [abc])

An agent sends ``authorization: Bearer TOKEN`` on ``OpenReverseTunnel``.
A missing or unknown token is UNAUTHENTICATED; a known token asking for a
key none of its patterns matches is PERMISSION_DENIED.  Patterns match the
whole key, case-sensitively.  The same hash may not appear twice.
"""

from __future__ import annotations

import hashlib
import hmac
import re
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from ._config import UsageError, read_toml

__all__ = ["Grant", "TokenFile", "hash_token"]

_HEX64 = re.compile(r"[0-9a-f]{64}")


def hash_token(token: str) -> str:
    """The hex SHA-256 of a token, as the tokens file holds it."""
    return hashlib.sha256(token.encode("utf-8")).hexdigest()


@dataclass(frozen=True, slots=True)
class Grant:
    """One entry of the file: a token's hash and the keys it may register."""

    name: str
    token_sha256: str
    keys: tuple[str, ...]

    def allows(self, key: str) -> bool:
        return any(fnmatchcase(key, pattern) for pattern in self.keys)


class TokenFile:
    """The parsed tokens file; ``grant_for(token)`` looks a token up."""

    def __init__(self, grants: list[Grant]) -> None:
        self.grants = grants

    @classmethod
    def load(cls, file: Path) -> TokenFile:
        document = read_toml(file)
        unknown = set(document) - {"agents"}
        if unknown:
            raise UsageError(f"{file}: unknown key {sorted(unknown)[0]!r} (expected [[agents]])")
        entries = document.get("agents", [])
        if not isinstance(entries, list):
            raise UsageError(f"{file}: 'agents' must be an array of tables ([[agents]])")
        grants: list[Grant] = []
        seen: set[str] = set()
        for number, entry in enumerate(entries, 1):
            grant = _grant(file, number, entry)
            if grant.token_sha256 in seen:
                raise UsageError(f"{file}: agents entry {number}: the same token-sha256 twice")
            seen.add(grant.token_sha256)
            grants.append(grant)
        return cls(grants)

    def grant_for(self, token: str) -> Grant | None:
        digest = hash_token(token)
        found = None
        # Compare with every entry in constant time; the loop leaks only
        # how many entries there are.
        for grant in self.grants:
            if hmac.compare_digest(grant.token_sha256, digest):
                found = grant
        return found


def _grant(file: Path, number: int, entry: Any) -> Grant:
    where = f"{file}: agents entry {number}"
    if not isinstance(entry, dict):
        raise UsageError(f"{where}: must be a table")
    unknown = set(entry) - {"name", "token-sha256", "keys"}
    if unknown:
        raise UsageError(f"{where}: unknown key {sorted(unknown)[0]!r}")
    digest = entry.get("token-sha256")
    if not isinstance(digest, str) or not _HEX64.fullmatch(digest.lower()):
        raise UsageError(f"{where}: token-sha256 must be 64 hex digits (grpctunnel hash-token)")
    keys = entry.get("keys")
    if not isinstance(keys, list) or not keys or not all(isinstance(k, str) and k for k in keys):
        raise UsageError(f"{where}: keys must be a non-empty list of key patterns")
    name = entry.get("name", f"agents entry {number}")
    if not isinstance(name, str):
        raise UsageError(f"{where}: name must be a string")
    return Grant(name, digest.lower(), tuple(keys))
