"""``python -m compolab.cli``: the ``compolab`` command (what ``torchrun -m compolab.cli`` launches)."""

import sys

from compolab.cli import main

sys.exit(main())
