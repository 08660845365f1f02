"""Where knsparse keeps what it computes once per machine (trained checkpoints, backend timings)."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """``$KNSPARSE_CACHE``, default ``~/.cache/knsparse``."""
    return Path(os.environ.get("KNSPARSE_CACHE", Path.home() / ".cache" / "knsparse"))
