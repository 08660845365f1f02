"""Provenance written into every benchmark JSON: device, versions, git commit, time."""

from __future__ import annotations

import json
from pathlib import Path

from knsparse.provenance import environment

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the environment block added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
