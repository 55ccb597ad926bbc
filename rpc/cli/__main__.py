"""``python -m rpc.cli`` runs the ``mgrpc`` command line."""

import sys

from rpc.cli import main

sys.exit(main())
