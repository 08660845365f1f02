"""Where a measurement came from: device, library versions and the git commit."""

from __future__ import annotations

import platform
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

import torch

_LIBRARIES = (
    "knsparse",
    "torch",
    "triton",
    "numpy",
    "scikit-learn",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "timm",
)


def package_version(name: str = "knsparse") -> str:
    """The installed version of ``name``, or ``"not installed"``."""
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return "not installed"


def git_commit(root: Path | None = None) -> str:
    """The commit of the checkout at ``root`` (default: the one this package runs from),
    ``"+dirty"`` when a tracked file is modified or an untracked ``*.py`` file exists (a new
    script produced the result). Benchmark outputs (``bench/results/``, tracked or not) do not
    count, or every benchmark run after the first would be dirty."""
    root = root or Path(__file__).resolve().parent
    try:
        commit = _git(root, "rev-parse", "HEAD")
        dirty = _git(root, "status", "--porcelain", "--untracked-files=no", "--", ":/", _RESULTS) or _git(
            root, "ls-files", "--others", "--exclude-standard", "--", ":/*.py"
        )
    except (OSError, subprocess.SubprocessError):
        return "unknown (not a git checkout)"
    return commit + ("+dirty" if dirty else "")


_RESULTS = ":(top,exclude)bench/results"


def _git(cwd: Path, *args: str) -> str:
    return subprocess.run(
        ["git", *args], cwd=cwd, capture_output=True, text=True, check=True, timeout=10
    ).stdout.strip()


def device_name(device: torch.device | str | None = None) -> str:
    """``"NVIDIA H100 80GB HBM3 (sm_90)"`` for a CUDA device, the CPU model otherwise."""
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return f"{torch.cuda.get_device_name(device)} (sm_{major}{minor})"
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu}"


def environment(device: torch.device | str | None = None) -> dict:
    """Device, thread count, Python/library versions (CUDA and cuSPARSELt where present),
    git commit, UTC date and command line of this run."""
    versions = {"python": platform.python_version()}
    versions.update({lib: v for lib in _LIBRARIES if (v := package_version(lib)) != "not installed"})
    if torch.version.cuda:
        versions["cuda"] = torch.version.cuda
    if torch.cuda.is_available() and hasattr(torch.backends, "cusparselt"):
        versions["cusparselt"] = str(torch.backends.cusparselt.version())
    return {
        "device": device_name(device),
        "torch_threads": torch.get_num_threads(),
        "versions": versions,
        "commit": git_commit(),
        "date": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "argv": sys.argv,
    }
