"""Benchmarks: direct grpclib vs our forward and reverse tunnels, and the others.

Run with ``python -m benchmarks`` (``make bench``); ``--quick`` is a ~30 s
smoke run.  Not part of the test suite.  ``docs/benchmarks.md`` explains
every figure; this package's layout:

* ``run`` (the ``__main__``): the parent.  Generates protobuf stubs for
  ``grpchantesting`` into a temporary directory, starts one child process per
  transport and event loop, collects their JSON, prints the table and writes
  ``benchmarks/results/latest.json``, ``docs/benchmarks.md`` and
  ``docs/benchmarks.png``.
* ``child``: one transport's measurements in a fresh process, so that memory
  figures, event-loop state and grpcio's threads never leak between
  transports (and grpctunnel-py's ``grpctunnel/v1/tunnel.proto`` never meets
  ours in one descriptor pool).
* ``workloads``: the measurements themselves, written once against a small
  client interface that every transport implements.
* ``grpclib_side`` / ``grpcio_side``: servers and clients for direct
  grpclib, our forward and reverse tunnels; direct grpcio.aio and
  grpctunnel-py's forward and reverse tunnels.
* ``profiling``: a cProfile of unary calls, attributed to codec, tunnel core,
  tunnel adapter, grpclib and the event loop.
* ``report``: the table, the Markdown page and the chart.
"""
