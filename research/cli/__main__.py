"""``python -m research.cli``: the ``research`` command."""

import sys

from research.cli.main import main

sys.exit(main())
