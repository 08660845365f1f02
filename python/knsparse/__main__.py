"""``python -m knsparse ...``, the same as the ``knsparse`` command.

Prefer the command (and ``torchrun --no-python knsparse ...``) inside a knsparse checkout:
``python -m`` puts the working directory first on ``sys.path``, where the repository's
top-level ``kernels/`` would shadow Hugging Face's ``kernels`` package."""

import sys

from .cli import main

sys.exit(main())
