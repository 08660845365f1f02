"""Provenance written into every benchmark JSON: device, versions, git commit, time, host load."""

from __future__ import annotations

import json
import os
from pathlib import Path

from knsparse.provenance import environment

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the environment block added. The host's load
    average (1, 5, 15 min) at write time is recorded too: CPU timings taken while other jobs ran
    are slower than on an idle machine, and the reader needs to know."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    env = {**environment(), "load_average_1_5_15min_at_write": list(os.getloadavg())}
    path.write_text(json.dumps({"environment": env, **payload}, indent=2) + "\n")
    return path
