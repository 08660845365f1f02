"""bench/bench_gemm.py plans its cases on CPU (the timing itself needs a GPU session)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

BENCH = Path(__file__).resolve().parent.parent / "bench" / "bench_gemm.py"


def load_bench():
    if str(BENCH.parent) not in sys.path:  # the script imports bench/_meta.py as a sibling
        sys.path.insert(0, str(BENCH.parent))
    spec = importlib.util.spec_from_file_location("bench_gemm", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules["bench_gemm"] = module  # dataclasses resolve annotations through sys.modules
    spec.loader.exec_module(module)
    return module


def test_dry_run_lists_vit_and_resnet_cases(capsys):
    bench = load_bench()
    assert bench.main(["--dry-run", "--linear-batches", "1,64", "--conv-batches", "8"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 * len(bench.VIT_LINEARS) + len(bench.RESNET50_CONVS)
    # 2 * 12608 * 3072 * 768 FLOP
    assert "linear mlp.fc1        batch   64  M= 12608 N= 3072 K=  768  GFLOP=    59.49" in lines
    # layer2.0.conv2: 3x3 stride 2 on 56x56 -> 28x28, K = 128*9
    assert "conv   layer2.0.conv2 batch    8  M=  6272 N=  128 K= 1152  GFLOP=     1.85" in lines


def test_conv_cases_use_the_rsc_reduction_length():
    bench = load_bench()
    for _, batch, (m, n, k), (c_in, c_out, kernel, stride, size) in bench.conv_cases([2]):
        p = (size + 2 * (kernel // 2) - kernel) // stride + 1
        assert (m, n, k) == (batch * p * p, c_out, c_in * kernel * kernel)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the record of a machine without CUDA")
def test_without_cuda_every_case_is_recorded_as_unavailable(monkeypatch, tmp_path):
    monkeypatch.setenv("KNSPARSE_RESULTS_DIR", str(tmp_path))
    bench = load_bench()
    assert bench.main(["--skip-conv", "--linear-batches", "1,2"]) == 0
    (path,) = tmp_path.glob("bench_gemm_*.json")
    result = json.loads(path.read_text())
    assert result["complete"] and result["dtypes"] == ["float16", "bfloat16"]
    assert len(result["results"]) == 2 * 2 * len(bench.VIT_LINEARS)
    assert {r["status"] for r in result["results"]} == {
        "unavailable: no CUDA device (torch.cuda.is_available() is False)"
    }
