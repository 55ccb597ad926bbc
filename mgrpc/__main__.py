"""``python -m mgrpc`` runs the ``mgrpc`` command line."""

import sys

from mgrpc.cli import main

sys.exit(main())
