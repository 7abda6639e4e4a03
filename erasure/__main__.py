"""`python -m erasure ...` (and `torchrun -m erasure ...`, `accelerate launch -m erasure ...`).

The launcher of the command line, which lives with the other apps (ui/cli.py): the one module of the
library that reaches an app, and nothing imports it.
"""

import sys

from ui.cli import main

sys.exit(main())
