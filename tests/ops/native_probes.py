"""Build the host-only C++ probes in tests/ops/native/ that run CUDA-side code on CPU.

They need a C++17 compiler, and the ones that read CUTLASS also the CUDA and CUTLASS headers
(nvidia-cutlass); tests that use them are skipped with the missing piece named when one is absent.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
CSRC = ROOT / "csrc"
NATIVE = Path(__file__).resolve().parent / "native"


def _cuda_include() -> Path | None:
    for home in (os.environ.get("CUDA_HOME"), os.environ.get("CUDA_PATH"), "/usr/local/cuda"):
        if home and (Path(home) / "include" / "cuda_runtime_api.h").is_file():
            return Path(home) / "include"
    return None


def _cutlass_include() -> Path | None:
    found = subprocess.run(
        [sys.executable, str(CSRC / "find_cutlass.py")], capture_output=True, text=True, check=False
    )
    return Path(found.stdout.strip()) if found.returncode == 0 else None


def build_probe(name: str, out_dir: Path, needs_cutlass: bool) -> Path:
    """Compile tests/ops/native/<name>.cpp into ``out_dir`` or skip the calling test. Probes that
    include CUTLASS also need the CUDA toolkit's headers (CUTLASS includes cuda/std)."""
    cxx = shutil.which(os.environ.get("CXX", "g++"))
    if cxx is None:
        pytest.skip("no C++ compiler (g++) to build the native probe")
    cmd = [cxx, "-std=c++17", "-O1", f"-I{CSRC}"]
    if needs_cutlass:
        cuda = _cuda_include()
        if cuda is None:
            pytest.skip("no CUDA headers (set CUDA_HOME) to build the CUTLASS probe")
        cmd += ["-isystem", str(cuda), "-isystem", str(cuda / "cccl")]
        cutlass = _cutlass_include()
        if cutlass is None:
            pytest.skip("no CUTLASS headers (pip install --no-deps nvidia-cutlass) to build the probe")
        cmd += ["-isystem", str(cutlass)]
    exe = out_dir / name
    subprocess.run([*cmd, str(NATIVE / f"{name}.cpp"), "-o", str(exe)], check=True, capture_output=True)
    return exe
