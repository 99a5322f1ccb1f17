"""``python -m paretoq`` = the ``paretoq`` command (handy under ``torchrun -m paretoq``)."""

import sys

from paretoq.cli import main

sys.exit(main())
