"""torch.distributed on CPU: 1 vs 2 processes, and the digits fine-tune through the CLI.

Part 1 (scaling): a ViT-B/16-shaped model (``knsparse.models.vit_base_patch16_224``, random
weights) calibrated (CAST's statistics: per-layer column sums of squares + 4x4 block Grams over
all 73 prunable layers) and fine-tuned for one epoch (masked distillation from the dense copy),
each under ``torchrun`` with 1 process x 1 thread, 2 processes x 1 thread (scaling efficiency
``t1 / (2 t2)``) and 1 process x 2 threads (what the same two cores give without processes).
Small image counts keep it to minutes; the work per image is what a real run does.

Part 2 (quality): the demo's prune (CAST/CAST-conv, permutation, ASR) followed by masked
fine-tuning of the built-in digits models, three ways in the same run: the demo pipeline (now
calling ``knsparse.finetune``), the demo's previous repair (label cross-entropy with
``knsparse.models.train``) and the command line ``knsparse prune`` + ``torchrun
--nproc-per-node 2 --no-python knsparse finetune``. Test accuracy of each.

Run:  .venv/bin/python bench/bench_distributed.py        (about 10-20 minutes on 2 loaded cores)
Writes bench/results/distributed.json and distributed.png.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from _meta import RESULTS, write_result

import knsparse as ks
from knsparse.utils import distributed

KNSPARSE = str(Path(sys.executable).with_name("knsparse"))  # the CLI, with no `python -m` (see the Makefile)

CALIB_IMAGES, CALIB_BATCH = 16, 4
TUNE_IMAGES, TUNE_BATCH = 16, 4  # global batch


def worker(out: str) -> None:
    """Under torchrun: time calibration and one fine-tuning epoch of ViT-B/16; rank 0 writes JSON."""
    from knsparse.core.layers import pattern_layers
    from knsparse.models import vit_base_patch16_224
    from knsparse.pruning.calibration import collect_input_stats

    distributed.init()
    torch.manual_seed(0)
    teacher = vit_base_patch16_224().eval()
    student = copy.deepcopy(teacher)
    masks = ks.prune(student, "magnitude", "2:4", inplace=True, progress=False).masks
    layers, _ = pattern_layers(teacher, ks.Pattern.parse("2:4"))
    g = torch.Generator().manual_seed(0)
    calib = list(torch.randn(CALIB_IMAGES, 3, 224, 224, generator=g).split(CALIB_BATCH))
    images = torch.randn(TUNE_IMAGES, 3, 224, 224, generator=g)
    distributed.barrier()
    start = time.perf_counter()
    collect_input_stats(teacher, layers, calib, group=4)
    distributed.barrier()
    calib_s = time.perf_counter() - start
    start = time.perf_counter()
    ks.finetune(student, teacher, images, epochs=1, plan=masks, batch_size=TUNE_BATCH, progress=False)
    distributed.barrier()
    tune_s = time.perf_counter() - start
    if distributed.is_main():
        row = {
            "processes": distributed.world_size(),
            "threads_per_process": torch.get_num_threads(),
            "calibration_seconds": calib_s,
            "finetune_epoch_seconds": tune_s,
            "load_average_1min_after": os.getloadavg()[0],
        }
        Path(out).write_text(json.dumps(row))
    distributed.shutdown()


def torchrun(nproc: int, args: list[str], threads: int) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}", *args]
    subprocess.run(cmd, env=env, check=True, stdout=subprocess.DEVNULL)


def scaling(tmp: Path) -> dict:
    rows = []
    for nproc, threads in ((1, 1), (2, 1), (1, 2)):
        out = tmp / f"scaling-{nproc}x{threads}.json"
        load = os.getloadavg()[0]
        torchrun(nproc, [__file__, "--worker", str(out)], threads)
        rows.append({**json.loads(out.read_text()), "load_average_1min_before": load})
        print(rows[-1])
    one, two = rows[0], rows[1]
    efficiency = {key: one[key] / (2 * two[key]) for key in ("calibration_seconds", "finetune_epoch_seconds")}
    return {
        "model": "vit_base_patch16_224 (random weights), 2:4 magnitude masks",
        "calibration": f"{CALIB_IMAGES} images in batches of {CALIB_BATCH}: collect_input_stats(group=4)",
        "finetune": f"1 epoch of {TUNE_IMAGES} images, global batch {TUNE_BATCH}, distilled from dense",
        "runs": rows,
        "scaling_efficiency_2_processes": efficiency,
    }


def digits(tmp: Path) -> dict:
    from knsparse.app import evaluate, load_digits_split, pretrained, train
    from knsparse.app.pipeline import prune_and_swap
    from knsparse.app.report import DEMO_METHOD, REPAIR_EPOCHS
    from knsparse.models import resnet_tiny_digits, vit_tiny_digits

    rows = {}
    for name, epochs in REPAIR_EPOCHS.items():
        data = load_digits_split(0)
        dense = pretrained(name)
        demo = prune_and_swap(
            copy.deepcopy(dense), "2:4", data, epochs, method=DEMO_METHOD[name], permute=True,
            repair="asr", progress=False,
        )  # fmt: skip
        old = ks.prune(
            copy.deepcopy(dense), DEMO_METHOD[name], "2:4", calib=calibration(data), permute=True,
            repair="asr", progress=False,
        )  # fmt: skip
        train(old.model, data, epochs, lr=5e-4, masks=old.masks, seed=0, progress=False)
        pruned, tuned = tmp / f"{name}-pruned.safetensors", tmp / f"{name}-tuned.safetensors"
        subprocess.run(
            [KNSPARSE, "prune", "--model", name, "--method", DEMO_METHOD[name],
             "--permute", "--repair", "asr", "--out", str(pruned), "--quiet"],
            check=True, stdout=subprocess.DEVNULL,
        )  # fmt: skip
        start = time.perf_counter()
        torchrun(2, ["--no-python", KNSPARSE, "finetune", "--model", name, "--weights", str(pruned),
                     "--epochs", str(epochs), "--out", str(tuned), "--quiet"], 1)  # fmt: skip
        seconds = time.perf_counter() - start
        command = vit_tiny_digits() if name.startswith("vit") else resnet_tiny_digits()
        ks.load_sparse(command, tuned)
        rows[name] = {
            "epochs": epochs,
            "test_accuracy_dense": demo.accuracy_dense,
            "test_accuracy_pruned_before_finetune": demo.accuracy_pruned,
            "test_accuracy_demo_pipeline_finetune": demo.accuracy_swapped,
            "test_accuracy_previous_demo_repair_cross_entropy": evaluate(old.model, data.x_test, data.y_test),
            "test_accuracy_cli_finetune_2_processes": evaluate(command, data.x_test, data.y_test),
            "cli_finetune_seconds_2_processes": seconds,
            "test_images": len(data.y_test),
        }
        print(name, rows[name])
    return rows


def calibration(data):
    from knsparse.app import calibration_batches

    return calibration_batches(data, seed=0)


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = result["runs"]
    labels = [f"{r['processes']} proc x {r['threads_per_process']} thr" for r in runs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.5))
    for ax, key, title in zip(
        axes,
        ("calibration_seconds", "finetune_epoch_seconds"),
        ("calibration", "1 fine-tuning epoch"),
        strict=True,
    ):
        ax.bar(labels, [r[key] for r in runs], color=["#888", "#1f77b4", "#aaa"])
        ax.set_title(f"ViT-B/16 {title} (CPU)")
        ax.set_ylabel("wall seconds")
        ax.tick_params(axis="x", labelsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--worker", metavar="OUT", help=argparse.SUPPRESS)
    parser.add_argument("--skip-digits", action="store_true")
    args = parser.parse_args()
    if args.worker:
        worker(args.worker)
        return
    with tempfile.TemporaryDirectory() as tmp:
        result = scaling(Path(tmp))
        if not args.skip_digits:
            result["digits"] = digits(Path(tmp))
    plot(result, RESULTS / "distributed.png")
    result["note"] = "CPU machine shared with other jobs: see the load averages per run"
    print(write_result("distributed", result))


if __name__ == "__main__":
    main()
