"""Several processes compute what one process computes (gloo on CPU, NCCL on CUDA).

Each multi-process test starts ``torchrun`` in a subprocess with a wall-clock limit and a
collective timeout, so a broken run fails instead of hanging the suite.
"""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from dist_job import run_job
from safetensors.torch import load_file, save_file

import knsparse as ks
from knsparse.models import vit_tiny_digits
from knsparse.sparse.modules import sparse_layers
from knsparse.utils import distributed

JOB = Path(__file__).with_name("dist_job.py")
KNSPARSE = str(Path(sys.executable).with_name("knsparse"))  # the CLI, never `python -m` (see the Makefile)
LIMIT_S = 300  # wall clock of one torchrun launch on a loaded machine; a hang fails here


def torchrun(nproc: int, *args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    env = {**os.environ, distributed.TIMEOUT_ENV: "60", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    return subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=LIMIT_S)


def compare(one: dict[str, torch.Tensor], many: dict[str, torch.Tensor]) -> None:
    assert set(one) == set(many)
    for key, want in one.items():
        got = many[key]
        if key.startswith(("masks/", "permuted/")) or not want.is_floating_point():
            assert torch.equal(want, got), key  # masks, permutations, counts: identical
        elif key.startswith("stats/"):
            scale = want.double().abs().max().clamp_min(1e-30)
            assert (want.double() - got.double()).abs().max() / scale <= 1e-6, key
        else:  # repaired and fine-tuned weights: float32 tolerance
            torch.testing.assert_close(got, want, msg=key)


@pytest.fixture(scope="module")
def one_process() -> dict[str, torch.Tensor]:
    return run_job()


def test_two_processes_equal_one(tmp_path: Path, one_process: dict[str, torch.Tensor]) -> None:
    """Calibration statistics, permutations, CAST-conv masks, ASR + BN-repaired weights and
    ViT weights after 8 DDP fine-tuning steps (global batch 16) on 2 gloo processes."""
    done = torchrun(2, str(JOB), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    compare(one_process, load_file(tmp_path / "results.safetensors"))


def test_killed_rank_fails_the_job(tmp_path: Path) -> None:
    done = torchrun(2, str(JOB), str(tmp_path), "--kill-rank", "1")
    assert done.returncode != 0
    assert "SIGKILL" in done.stderr and "dist_job.py FAILED" in done.stderr, done.stderr[-3000:]
    assert not (tmp_path / "results.safetensors").exists()


def test_cli_finetune_under_torchrun(tmp_path: Path) -> None:
    """``torchrun --no-python knsparse finetune`` on 2 processes: rank 0 alone prints and writes, the
    fine-tuned file keeps its 2:4 sparse layers, the metrics count every image once."""
    torch.manual_seed(0)
    teacher = vit_tiny_digits()
    student = copy.deepcopy(teacher)
    masks = ks.prune(student, "magnitude", "2:4", inplace=True, progress=False).masks
    ks.swap_modules(student, masks)
    dense, pruned, tuned = (tmp_path / f"{n}.safetensors" for n in ("dense", "pruned", "tuned"))
    save_file(teacher.state_dict(), str(dense))
    ks.save_sparse(student, pruned)
    g = torch.Generator().manual_seed(0)
    data = tmp_path / "data.safetensors"
    save_file(
        {"inputs": torch.randn(64, 1, 8, 8, generator=g), "labels": torch.randint(0, 10, (64,))}, str(data)
    )
    metrics = tmp_path / "metrics.json"
    done = torchrun(
        2, "--no-python", KNSPARSE, "finetune", "--model", "vit_tiny_digits", "--weights", str(pruned),
        "--teacher-weights", str(dense), "--data", str(data), "--val", str(data), "--epochs", "2",
        "--batch-size", "16", "--out", str(tuned), "--checkpoint-dir", str(tmp_path / "ckpt"),
        "--metrics", str(metrics), "--quiet",
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.count("wrote ") == 1
    epochs = json.loads(metrics.read_text())["epochs"]
    assert [e["processes"] for e in epochs] == [2, 2] and [e["images"] for e in epochs] == [64, 64]
    assert (tmp_path / "ckpt" / "epoch2.safetensors").is_file()
    loaded = vit_tiny_digits()
    ks.load_sparse(loaded, tuned)
    layers = sparse_layers(loaded)
    assert set(layers) == set(masks)
    for name, layer in layers.items():
        assert torch.equal(layer.mask(), masks[name]), name


def test_helpers_without_a_process_group() -> None:
    assert not distributed.active() and distributed.world_size() == 1 and distributed.is_main()
    assert list(distributed.shard(range(3))) == [0, 1, 2]
    t = {"a": torch.ones(2)}
    assert distributed.all_reduce_sum(t)["a"] is t["a"]


@pytest.mark.gpu
def test_nccl_equals_one_process(tmp_path: Path) -> None:
    """The same job over NCCL (2 GPUs, or 1 process on 1 GPU: the collectives still run
    through NCCL) against one process without a process group on the same GPU."""
    nproc = min(2, torch.cuda.device_count())
    done = torchrun(nproc, str(JOB), str(tmp_path))
    assert done.returncode == 0, done.stderr[-3000:]
    compare(run_job("cuda:0"), load_file(tmp_path / "results.safetensors"))
