"""`python -m erasure ...` (and `torchrun -m erasure ...`, `accelerate launch -m erasure ...`)."""

import sys

from .cli import main

sys.exit(main())
