"""``python -m kvagent.cli``: the ``kvagent`` command."""

import sys

from . import main

sys.exit(main())
