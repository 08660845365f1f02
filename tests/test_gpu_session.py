"""bench/gpu_session.sh --dry-run: the GPU session's plumbing on this CPU machine, so the script
cannot rot between GPU sessions (every step runs, the GPU ones take their "no device" path)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path

import pytest
import torch

SCRIPT = Path(__file__).resolve().parent.parent / "bench" / "gpu_session.sh"
STEPS = ["device", "install", "native", "correct", "gpu", "gemm", "audit", "yopo", "speed"]


@pytest.mark.slow  # about 1 minute on an idle machine: it collects the whole suite once more
@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run is the CPU machine's rehearsal")
def test_dry_run_runs_every_step_and_keeps_the_output_small(tmp_path):
    out = tmp_path / "session"
    run = subprocess.run(
        ["bash", str(SCRIPT), "--dry-run", str(out)], capture_output=True, text=True, timeout=1800, check=True
    )
    log = (out / "session.log").read_text()
    exits = dict(re.findall(r"^=== (\w+): exit (\d+) after", log, flags=re.M))
    assert list(exits) == STEPS, run.stdout
    assert all(code == "0" for code in exits.values()), log[-3000:]
    assert "knsparse-cuda: unavailable" in log
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 9, files
    (gemm,) = [f for f in files if f.startswith("bench_gemm_")]
    result = json.loads((out / gemm).read_text())
    assert result["complete"] and result["results"]
    assert all(r["status"].startswith("unavailable: no CUDA device") for r in result["results"])
