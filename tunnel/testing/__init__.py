"""Test support shipped with the library (needs the ``testing`` extra: betterproto).

- :class:`TestService`: a wire-compatible Python implementation of the
  ``grpchantesting.TestService`` that the Go reference (jhump/grpctunnel)
  tests every tunnel with.
- :class:`Message`, :class:`TestServiceStub`, :class:`TestServiceBase`: the
  betterproto classes generated from ``proto/grpchantesting/test.proto``
  (the message, a client stub, and a base class for your own
  implementation), for examples and tests of your own.
- :mod:`tunnel.testing.conformance`: cases that call that service through any
  ``grpclib.client.Channel`` and check what the caller observes, so a
  deployment (tunneled or not) can be self-tested::

      from tunnel.testing.conformance import run_conformance, verify_conformance

      verify_conformance(await run_conformance(channel))
"""

try:
    import betterproto  # noqa: F401
except ModuleNotFoundError as exc:
    if exc.name != "betterproto":
        raise
    raise ModuleNotFoundError(
        "tunnel.testing needs the 'testing' extra: pip install 'grpclib-tunnel[testing]'",
        name=exc.name,
    ) from exc

from tunnel.testing._pb.grpchantesting import Message, TestServiceBase, TestServiceStub
from tunnel.testing.service import TestService

__all__ = ["Message", "TestService", "TestServiceBase", "TestServiceStub"]
