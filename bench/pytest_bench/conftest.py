"""pytest-benchmark suite of the CPU ops (``make bench-cpu``); outside ``tests/`` (the only
``testpaths``), so ``make test`` never collects it.

Every benchmark group times one op twice on the same input: ``knsparse`` (what the package
runs) and ``reference`` (the plain-PyTorch way to compute the same result), after asserting the
two outputs agree. ``bench/pytest_bench_report.py`` turns the JSON into a table.
"""

from __future__ import annotations

import os

import pytest
import torch


def pytest_configure(config: pytest.Config) -> None:
    """``KNSPARSE_BENCH_THREADS=N``: torch (and the NMF C twin, which follows torch) on N threads.
    On a host other jobs load, one thread avoids the stalls of a parallel region waiting for a
    descheduled thread, which make small ops tens of times slower at random."""
    threads = os.environ.get("KNSPARSE_BENCH_THREADS")
    if threads:
        torch.set_num_threads(int(threads))


def pytest_report_header(config: pytest.Config) -> str:
    return f"torch {torch.__version__}, {torch.get_num_threads()} threads"


@pytest.fixture
def record(benchmark):
    """``record(op, impl, **info)``: names the row of the report (``impl``: "knsparse" or
    "reference") and stores the input sizes and the thread count with the timing."""

    def note(op: str, impl: str, **info: object) -> None:
        benchmark.group = op
        benchmark.extra_info.update(op=op, impl=impl, threads=torch.get_num_threads(), **info)

    return note
