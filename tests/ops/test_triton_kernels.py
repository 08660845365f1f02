"""Run the Triton-vs-reference checks in a fresh process.

Triton reads ``TRITON_INTERPRET`` when it is first imported, so on a machine without CUDA the
checks run in a subprocess that sets it; with a GPU they compile and run on CUDA tensors.
"""

import os
import subprocess
import sys
from pathlib import Path

import torch

CHECKS = Path(__file__).parent / "triton_interpret" / "check_kernels.py"
# The executable, not `python -m pytest`: that would put the working directory (the repository
# root under `make test`) first on sys.path, where kernels/ shadows Hugging Face's `kernels`.
PYTEST = str(Path(sys.executable).with_name("pytest"))


def test_triton_kernels_match_their_references():
    env = dict(os.environ)
    if not torch.cuda.is_available():
        env["TRITON_INTERPRET"] = "1"
    proc = subprocess.run(
        [PYTEST, "-q", "-p", "no:cacheprovider", str(CHECKS)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:]
    assert " passed" in proc.stdout
