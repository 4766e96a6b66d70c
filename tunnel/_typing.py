"""Typing protocols of the public API.

grpclib describes "an object a ``Server`` takes" with ``IServable`` in its
private ``grpclib._typing``, a module that imports ``typing_extensions`` at
run time although grpclib only declares it for type checking: importing it
breaks a plain install.  This is the same structural type, with the standard
library's ``Protocol``, so anything grpclib's ``Server`` accepts is accepted
here too.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Protocol

from grpclib.const import Handler

__all__ = ["Servable"]


class Servable(Protocol):
    """A service (generated ``*Base`` class, ``grpclib.health.service.Health``, ...)."""

    def __mapping__(self) -> Mapping[str, Handler]: ...
