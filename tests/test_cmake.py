"""The CUDA build description (issue 24, item 2) without compiling CUDA: CMakeLists.txt builds
every unit of csrc/ for its architectures, the Makefile holds no second build description,
csrc/ptxas_guard.sh fails a compile on ptxas's "Potential Performance Loss", and a missing
CUTLASS stops the configure step with a message saying what to pass."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
CMAKELISTS = (ROOT / "CMakeLists.txt").read_text()
GUARD = ROOT / "csrc" / "ptxas_guard.sh"


def cmake_list(name: str) -> list[str]:
    """The entries of ``set(NAME ...)`` in CMakeLists.txt."""
    match = re.search(rf"^set\({name}\s+(.*?)\)", CMAKELISTS, re.MULTILINE | re.DOTALL)
    assert match, f"CMakeLists.txt has no set({name} ...)"
    return match.group(1).split()


def test_every_kernel_unit_is_built_once_for_its_architectures():
    groups = {g: cmake_list(g) for g in ("SM80_UNITS", "SM90_UNITS", "BOTH_UNITS")}
    listed = [unit for units in groups.values() for unit in units]
    on_disk = sorted(f"csrc/{p.name}" for p in (ROOT / "csrc").glob("*.cu"))
    assert sorted(listed) == on_disk, "each csrc/*.cu in exactly one architecture group"
    assert all("sm80" in u for u in groups["SM80_UNITS"]) and all("sm90" in u for u in groups["SM90_UNITS"])
    assert cmake_list("SM80") == [
        "-gencode=arch=compute_80,code=sm_80",
        "-gencode=arch=compute_80,code=compute_80",
    ]
    assert cmake_list("SM90") == ["-gencode=arch=compute_90a,code=sm_90a"]
    assert "${SM80};${SM90}" in CMAKELISTS  # im2col: both
    assert "csrc/capi.cpp" in CMAKELISTS and "CUDA_RUNTIME_LIBRARY Static" in CMAKELISTS
    assert "-DNDEBUG" in CMAKELISTS and "csrc/ptxas_guard.sh" in CMAKELISTS


def test_makefile_has_no_second_build_description():
    makefile = (ROOT / "Makefile").read_text()
    assert "cmake --build" in makefile
    for rule in (r"\bnvcc\b", "gencode", r"\.cu\b", r"\bgrep\b"):
        assert not re.search(rule, makefile), f"the Makefile still has {rule!r}: CMakeLists.txt is the build"


def run_guard(tmp_path: Path, script: str) -> tuple[subprocess.CompletedProcess, Path]:
    """ptxas_guard.sh around a fake compiler running ``script`` (``$object``: the path after -o)."""
    compiler = tmp_path / "fake-nvcc"
    compiler.write_text(f"#!/bin/sh\nobject=$4\n{script}\n")
    compiler.chmod(0o755)
    obj = tmp_path / "unit.o"
    result = subprocess.run(
        [str(GUARD), str(compiler), "-c", "unit.cu", "-o", str(obj)], capture_output=True, text=True
    )
    return result, obj


def test_guard_fails_the_compile_on_potential_performance_loss(tmp_path):
    loss = "ptxas info    : (C7510) Potential Performance Loss: wgmma.mma_async instructions are serialized"
    result, obj = run_guard(tmp_path, f'echo ok > "$object"; echo "{loss}" >&2')
    assert result.returncode == 1 and not obj.exists()
    assert loss in result.stdout and "fails this build" in result.stderr


def test_guard_passes_a_clean_compile_and_its_output_through(tmp_path):
    result, obj = run_guard(tmp_path, 'echo ok > "$object"; echo "some warning" >&2')
    assert result.returncode == 0 and obj.read_text() == "ok\n" and "some warning" in result.stdout


def test_guard_keeps_a_failing_compiler_s_status(tmp_path):
    result, _ = run_guard(tmp_path, 'echo "error: boom" >&2; exit 3')
    assert result.returncode == 3 and "error: boom" in result.stdout


NO_CMAKE = shutil.which("cmake") is None or shutil.which("nvcc") is None
CONFIGURE_FAILURES = [
    pytest.param(
        [f"-DPython_EXECUTABLE={sys.executable}"],
        {"KNSPARSE_CUTLASS_INCLUDE": "/nonexistent"},  # find_cutlass.py's own override, wrong
        f"CUTLASS headers not found by {sys.executable} csrc/find_cutlass.py",
        id="find_cutlass-fails",
    ),
    pytest.param(
        ["-DKNSPARSE_CUTLASS_INCLUDE=/nonexistent"],
        {},
        "'/nonexistent' (from KNSPARSE_CUTLASS_INCLUDE) has no cutlass/cutlass.h",
        id="bad-override",
    ),
]


@pytest.mark.skipif(NO_CMAKE, reason="needs cmake and nvcc")
@pytest.mark.parametrize("args, env, message", CONFIGURE_FAILURES)
def test_configure_without_cutlass_is_a_clear_fatal_error(tmp_path, monkeypatch, args, env, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    result = subprocess.run(
        ["cmake", "-S", str(ROOT), "-B", str(tmp_path / "build"), *args], capture_output=True, text=True
    )
    assert result.returncode != 0
    assert "CMake Error" in result.stderr and message in " ".join(result.stderr.split())
