"""The conformance suite: every case over every channel mode, against direct grpclib."""
