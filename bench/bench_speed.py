"""Speed at production scale, each figure with its competitor measured in the same run.

* YOPO single-shot: one whole-model ``yopo`` call per fresh process vs scikit-learn's
  ``NMF(solver="mu")`` loop (ResNet-18 shapes and ViT-B/16), see ``bench_yopo.py --single-shot``;
* permutation: whole ResNet-50 / ViT-B/16 ``permute`` with its defaults vs its previous defaults,
  and on apex's published case (64 channels x 128 rows) vs the apex-style greedy channel-swap
  search (``knsparse.permutation.baseline``), see ``bench_permute.py``;
* calibration: images/s of the one-pass streaming statistics vs a hook-based reference, see
  ``bench_calibration.py``.

Writes ``bench/results/speed.json`` and ``speed.png``; host, load average (before and after each
part) and versions are recorded, since the machine may be shared.

    python bench/bench_speed.py --iters 100 --reps 1
"""

from __future__ import annotations

import argparse
import os

import matplotlib

matplotlib.use("Agg")
import bench_calibration
import bench_permute
import bench_yopo
import matplotlib.pyplot as plt
import torch
from _meta import RESULTS, write_result


def _load() -> list[float]:
    return list(os.getloadavg())


def apex_case(matrices: int) -> dict:
    weights = [bench_permute._uniform(128, 64, s) for s in range(matrices)]
    return bench_permute._compare("apex", weights, "2:4", 1000, True)


def plot(result: dict, path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    ax = axes[0]
    labels, ours, theirs = [], [], []
    for model, e in result["yopo_single_shot"]["single_shot"].items():
        labels.append(model)
        ours.append(e["methods"]["knsparse"]["median_s"])
        theirs.append(e["methods"]["sklearn"]["median_s"])
    _bars(ax, labels, ours, theirs, ("knsparse yopo", "scikit-learn NMF loop"), "seconds (fresh process)")
    ax.set_title("YOPO single-shot, whole model")
    ax = axes[1]
    labels, ours, theirs = [], [], []
    for model, e in result["permutation_models"].items():
        labels.append(model)
        ours.append(e["knsparse"]["cpu_seconds"])
        theirs.append(e["previous_defaults"]["cpu_seconds"])
        ax.annotate(
            f"eff {e['knsparse']['mean_efficacy']:.1%} vs {e['previous_defaults']['mean_efficacy']:.1%}",
            (len(labels) - 1, max(ours[-1], theirs[-1])),
            ha="center",
            fontsize=7,
        )
    _bars(ax, labels, ours, theirs, ("permute (defaults)", "previous defaults"), "CPU seconds")
    ax.set_title("whole-model permutation, 2:4")
    ax = axes[2]
    labels, ours, theirs = [], [], []
    for model, e in result["calibration"]["models"].items():
        labels.append(model)
        ours.append(e["knsparse"]["images_per_s"])
        theirs.append(e["hook_reference"]["images_per_s"])
    _bars(ax, labels, ours, theirs, ("one-pass streaming", "hook reference"), "images / s")
    ax.set_title("calibration statistics, CPU")
    fig.suptitle(f"shared 2-core CPU, load {result['load_before'][0]:.1f} at start", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _bars(ax, labels, ours, theirs, names, ylabel) -> None:
    x = range(len(labels))
    ax.bar([i - 0.2 for i in x], ours, 0.4, label=names[0])
    ax.bar([i + 0.2 for i in x], theirs, 0.4, label=names[1])
    ax.set_xticks(list(x), labels, fontsize=8)
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=7)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--iters", type=int, default=100, help="YOPO NMF iterations")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per YOPO method")
    parser.add_argument("--images", type=int, default=8, help="calibration images")
    parser.add_argument("--apex-matrices", type=int, default=5)
    parser.add_argument("--threads", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    result = {"benchmark": "speed at production scale", "host": bench_yopo.host(), "load_before": _load()}
    result["yopo_single_shot"] = bench_yopo.single_shot_result(
        ["resnet18", "vit_base_patch16_224"], 7, args.iters, args.reps
    )
    result["load_after_yopo"] = _load()
    result["permutation_models"] = bench_permute.models_case(["resnet50", "vit_base_patch16_224"])
    result["permutation_apex_case"] = apex_case(args.apex_matrices)
    result["load_after_permutation"] = _load()
    result["calibration"] = bench_calibration.run(
        ["vit_base_patch16_224", "resnet50"], args.images, 4, args.threads
    )
    result["load_after"] = _load()
    path = write_result("speed", result)
    plot(result, RESULTS / "speed.png")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
