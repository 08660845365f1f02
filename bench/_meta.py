"""Provenance written into every benchmark JSON: device, versions, git commit, time, host load."""

from __future__ import annotations

import json
import os
from pathlib import Path

from knsparse.utils.provenance import environment

RESULTS = Path(__file__).resolve().parent / "results"


def results_dir() -> Path:
    """Where :func:`write_result` writes: ``$KNSPARSE_RESULTS_DIR`` (bench/gpu_session.sh gathers
    one session's results in its output folder) or bench/results/."""
    return Path(os.environ.get("KNSPARSE_RESULTS_DIR") or RESULTS)


def write_result(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the environment block added. The host's load
    average (1, 5, 15 min) at write time is recorded too: CPU timings taken while other jobs ran
    are slower than on an idle machine, and the reader needs to know."""
    path = results_dir() / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    env = {**environment(), "load_average_1_5_15min_at_write": list(os.getloadavg())}
    path.write_text(json.dumps({"environment": env, **payload}, indent=2) + "\n")
    return path
