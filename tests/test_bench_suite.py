"""The pytest-benchmark suite (``bench/pytest_bench``, ``make bench-cpu``) is collected only when
asked: ``make test``'s pytest reads ``testpaths`` and never reaches it, and asked for, it
collects a knsparse and a reference row for every op."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "bench" / "pytest_bench"
OPS = ("pack_24", "unpack_24", "nm_mask", "nmf", "im2col_rsc", "permutation_step", "calibration")


def _pytest() -> list[str]:
    script = Path(sys.executable).with_name("pytest")
    return [str(script)] if script.is_file() else [sys.executable, "-P", "-m", "pytest"]


def test_default_run_never_reaches_the_benchmark_suite(pytestconfig: pytest.Config) -> None:
    assert pytestconfig.getini("testpaths") == ["tests"]  # what `pytest` with no path collects
    assert not SUITE.resolve().is_relative_to((ROOT / "tests").resolve())


def test_the_suite_collects_both_sides_of_every_op_when_asked() -> None:
    run = subprocess.run(
        [*_pytest(), "--collect-only", "-q", "-p", "no:cacheprovider", str(SUITE)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
    )
    assert run.returncode == 0, run.stdout + run.stderr
    ids = {line.split("::")[-1] for line in run.stdout.splitlines() if "::" in line}
    assert ids == {f"test_{op}[{impl}]" for op in OPS for impl in ("knsparse", "reference")}, ids
