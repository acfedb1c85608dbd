"""``python -m curvlinops``: the same as the ``curvlinops`` command."""

import sys

from curvlinops.cli import main

sys.exit(main())
