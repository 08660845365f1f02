"""``python -m knsparse ...`` (what ``torchrun --nproc-per-node N -m knsparse ...`` runs)."""

import sys

from .cli import main

sys.exit(main())
