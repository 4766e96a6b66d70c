"""``python -m tunnel``: the ``grpctunnel`` command (see ``tunnel.cli``)."""

import sys

from tunnel.cli import main

sys.exit(main())
