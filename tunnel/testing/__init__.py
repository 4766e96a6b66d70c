"""Test support shipped with the library (needs the ``testing`` extra: betterproto).

- :class:`TestService`: a wire-compatible Python implementation of the
  ``grpchantesting.TestService`` that the Go reference (jhump/grpctunnel)
  tests every tunnel with.
- :mod:`tunnel.testing.conformance`: cases that call that service through any
  ``grpclib.client.Channel`` and check what the caller observes, so a
  deployment (tunneled or not) can be self-tested::

      from tunnel.testing.conformance import run_conformance, verify_conformance

      verify_conformance(await run_conformance(channel))
"""

from tunnel.testing.service import TestService

__all__ = ["TestService"]
