"""``python -m paretoq.cli`` = the ``paretoq`` command."""

import sys

from paretoq.cli import main

sys.exit(main())
