"""Provenance written into every benchmark JSON: device, versions, git commit, time."""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import torch

RESULTS = Path(__file__).resolve().parent / "results"


def _git_commit() -> str:
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            check=True,
            cwd=Path(__file__).parent,
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=Path(__file__).parent,
        ).stdout.strip()
        return out.stdout.strip() + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def environment() -> dict:
    """Device name, library versions, thread count and commit of this run."""
    versions = {"python": platform.python_version(), "torch": torch.__version__}
    for mod in ("triton", "numpy", "sklearn", "onnx", "onnxruntime"):
        try:
            versions[mod] = __import__(mod).__version__
        except ImportError:
            continue
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
        versions["cuda"] = torch.version.cuda
    else:
        device = f"CPU: {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    return {
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": _git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }


def write_result(name: str, payload: dict) -> Path:
    """Write ``bench/results/<name>.json`` with the environment block added."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps({"environment": environment(), **payload}, indent=2) + "\n")
    return path
