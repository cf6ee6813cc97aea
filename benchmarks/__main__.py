"""``python -m benchmarks``: see ``benchmarks/run.py`` and ``--help``."""

import sys

from .run import main

sys.exit(main())
