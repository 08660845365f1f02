"""The wheel carries every native part: built here (``pip wheel``), installed without the source
tree into a fresh virtual environment (its dependencies borrowed from this one through a
``.pth`` file, nothing downloaded), it finds kernels/nmf_cpu.c and, when ``make cuda`` has
built it, libknsparse_cuda.so, and ``knsparse demo`` runs there."""

from __future__ import annotations

import os
import site
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
CUDA_LIBRARY = ROOT / "python" / "knsparse" / "ops" / "libknsparse_cuda.so"

PROBE = """
import knsparse, knsparse.kernels.native as kn
from knsparse.ops import native
assert knsparse.__file__.startswith({prefix!r}), knsparse.__file__
assert kn.load("nmf_cpu.c", (("RANK", 7),)) is not None, "nmf_cpu.c missing from the wheel"
print("cuda library:", native.load_error() or "loaded")
"""


def _dependency_paths() -> list[str]:
    """This interpreter's site directories (and what their .pth files add), minus the source
    tree. A virtual environment inside the checkout (CI's ``.venv``) stays: a directory listed in
    a ``.pth`` file is not scanned for ``.pth`` files itself, so its editable install of the
    source tree is not picked up."""
    paths = [
        *site.getsitepackages(),
        *(p for p in sys.path if p.endswith(("site-packages", "dist-packages"))),
    ]
    source = (str(ROOT / "python"), str(ROOT / "kernels"))
    return [p for p in dict.fromkeys(paths) if os.path.isdir(p) and not p.startswith(source)]


@pytest.mark.slow  # builds a wheel and runs the demo: about 2 minutes on an idle 2-core machine
def test_wheel_installs_into_a_fresh_venv_and_runs_the_demo(tmp_path):
    with_cuda = CUDA_LIBRARY.is_file()
    wheels = tmp_path / "wheels"
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", wheels, ROOT],
        check=True,
        cwd=tmp_path,
        timeout=900,
    )
    (wheel,) = wheels.glob("knsparse-*.whl")
    assert wheel.name.endswith("-any.whl") != with_cuda  # a platform tag with the library
    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", venv], check=True, timeout=300)
    python = venv / "bin" / "python"
    purelib = subprocess.run(
        [python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout.strip()
    subprocess.run(
        [sys.executable, "-m", "pip", "--python", python, "install", "-q", "--no-deps", "--no-index", wheel],
        check=True,
        timeout=600,
    )
    Path(purelib, "zz_dependencies.pth").write_text("\n".join(_dependency_paths()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "KNSPARSE_CUDA_LIBRARY")}
    probe = subprocess.run(
        [python, "-c", PROBE.format(prefix=str(venv))],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=600,
    )
    assert probe.returncode == 0, probe.stderr
    assert ("cuda library: loaded" in probe.stdout) == with_cuda, probe.stdout
    demo = subprocess.run(
        [venv / "bin" / "knsparse", "demo", "--quiet", "--batch-sizes", "1,8", "--out", tmp_path / "report"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env=env,
        timeout=1200,
    )
    assert demo.returncode == 0, demo.stderr[-3000:]
    assert "package data missing" not in demo.stderr and "PyTorch reference" not in demo.stderr
    assert (tmp_path / "report").is_dir()
