"""``python -m auxgen``: the ``auxgen`` command line (see :mod:`auxgen.cli`)."""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
