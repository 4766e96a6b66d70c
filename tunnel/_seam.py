"""Every place this package reaches into grpclib's private parts.

grpclib has no public API for a few things a tunnel needs.  Each such touch
lives in this module, as a small function whose docstring says what it
relies on and why no public API does the job, so a grpclib release that
moves one of them breaks here, by name, and nowhere else.
``tests/test_seam.py`` checks that each of them still exists and behaves as
assumed.

The touches, one line each (keep this list in step with the code):
"""

from __future__ import annotations

__all__: list[str] = []
