"""Speed at production scale: every figure beside its competitor, measured in one run.

Parts (each delegates to the benchmark that owns it, so there is one implementation per idea):

* ``yopo`` — one whole-model YOPO call in a fresh Python process (what a user pays), against a
  scikit-learn ``NMF(solver="mu")`` loop over the same matrices, on a ResNet-18-shaped stack of
  convolutions and on ViT-B/16's weights (``bench_yopo.py --single-shot``); the residuals must
  agree within 1 %.
* ``permutation`` — ``permute(model, "2:4")`` with its defaults on whole ResNet-50 and ViT-B/16
  (timm when it imports, else knsparse's models of the same shapes), against apex ASP's greedy
  channel-swap search written from its description (``bench_permute.py --models``: the baseline
  runs on one group per distinct shape where one of its steps fits in memory, capped in time per
  group; speed-up and efficacy compare those same groups). Slow: the baseline takes minutes.
* ``calibration`` — images/s of knsparse's one-pass statistics (CAST's column norms and block
  Gram matrices for every prunable layer in one forward pass per batch) against a hook-based
  reference that stores every layer's inputs (``bench_calibration.py``); the statistics must agree.

    python bench/speed.py                      # all parts -> bench/results/speed.json and .png
    python bench/speed.py --parts yopo         # one part (the JSON holds what ran)

Figures are CPU wall-clock seconds on this machine with 2 torch threads unless the JSON says
otherwise; the host's load is recorded before and after every part, since a shared machine makes
every timing slower.
"""

from __future__ import annotations

import argparse
import os
import time
from collections.abc import Callable

import bench_calibration
import bench_permute
import bench_yopo
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _meta import results_dir, write_result

MODELS = ("resnet50", "vit_base_patch16_224")


def yopo_part(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    models = ["resnet18", "vit_base_patch16_224"]
    raw = bench_yopo.single_shot_result(models, rank=7, iters=100, reps=args.reps)
    rows = []
    for model, entry in raw["single_shot"].items():
        ours, theirs = entry["methods"]["knsparse"], entry["methods"]["sklearn"]
        rows.append(
            {
                "part": "yopo single-shot",
                "model": model,
                "knsparse_s": ours["median_s"],
                "competitor": "scikit-learn NMF(mu) loop",
                "competitor_s": theirs["median_s"],
                "speedup": entry["speedup_vs_sklearn"],
                "target_speedup": 3.0,
                "quality": f"residual {entry['recon_error_rel_diff_vs_sklearn']:+.2%} vs scikit-learn",
            }
        )
    return raw, rows


def permutation_part(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    raw = bench_permute.models_case(list(MODELS))
    rows = []
    for model, entry in raw.items():
        ours, theirs = entry["knsparse_defaults"], entry["greedy_baseline"]
        same = [g for g in entry["groups"] if "greedy_efficacy" in g]
        ours_same_s = sum(g["knsparse_seconds_share"] for g in same)
        rows.append(
            {
                "part": "permutation (whole model)",
                "model": model,
                "knsparse_s": ours["seconds"],
                "competitor": (
                    f"apex-style greedy swap on {theirs['groups_run']} of the groups "
                    f"(<= {theirs['cap_seconds_per_group']} s each)"
                ),
                "competitor_s": theirs["seconds"],
                "speedup": theirs["seconds"] / ours_same_s if ours_same_s else None,
                "target_seconds": 20.0,
                "quality": (
                    f"mean group efficacy {ours['mean_efficacy']:.1%} ({ours['groups_permuted']}/"
                    f"{ours['groups']} groups); on the baseline's groups "
                    f"{theirs['knsparse_mean_efficacy_same_groups']:.1%} vs {theirs['mean_efficacy']:.1%}"
                ),
            }
        )
    return raw, rows


def calibration_part(args: argparse.Namespace) -> tuple[dict, list[dict]]:
    raw = bench_calibration.run(list(MODELS), args.images, args.batch)
    rows = []
    for model, entry in raw["models"].items():
        ours, theirs = entry["knsparse"], entry["hook_reference"]
        rows.append(
            {
                "part": "calibration statistics",
                "model": model,
                "knsparse_s": ours["seconds"],
                "knsparse_images_per_s": ours["images_per_s"],
                "competitor": "hook-based reference (stores every layer's inputs)",
                "competitor_s": theirs["seconds"],
                "competitor_images_per_s": theirs["images_per_s"],
                "speedup": entry["speedup_vs_reference"],
                "quality": f"statistics max rel. diff {entry['max_rel_diff_vs_reference']:.1e}",
            }
        )
    return raw, rows


PARTS: dict[str, Callable[[argparse.Namespace], tuple[dict, list[dict]]]] = {
    "yopo": yopo_part,
    "permutation": permutation_part,
    "calibration": calibration_part,
}


def plot(rows: list[dict], path) -> None:
    """One bar per figure: knsparse's speed-up over its competitor (log scale)."""
    fig, ax = plt.subplots(figsize=(8, 0.5 * len(rows) + 1.5))
    rows = [r for r in rows if r["speedup"]]
    labels = [f"{r['part']}\n{r['model']}" for r in rows]
    speedups = [r["speedup"] for r in rows]
    bars = ax.barh(labels, speedups, color=["C0" if s >= 1 else "C3" for s in speedups])
    for bar, r in zip(bars, rows, strict=True):
        ax.annotate(
            f" {r['speedup']:.2f}x  ({r['knsparse_s']:.1f} s vs {r['competitor_s']:.1f} s)",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2),
            va="center",
            fontsize=7,
        )
    ax.axvline(1, color="black", linewidth=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("speed-up of knsparse over its competitor (wall clock, same run; log)")
    ax.invert_yaxis()
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=list(PARTS), default=list(PARTS))
    parser.add_argument("--threads", type=int, default=2, help="torch intra-op threads (default 2)")
    parser.add_argument("--reps", type=int, default=1, help="fresh processes per YOPO method and model")
    parser.add_argument("--images", type=int, default=16, help="calibration images per model")
    parser.add_argument("--batch", type=int, default=8, help="calibration batch size")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    parts, rows = {}, []
    for name in args.parts:
        load_before, started = list(os.getloadavg()), time.perf_counter()
        raw, part_rows = PARTS[name](args)
        parts[name] = {
            "load_average_1_5_15min_before": load_before,
            "load_average_1_5_15min_after": list(os.getloadavg()),
            "seconds": time.perf_counter() - started,
            "result": raw,
        }
        rows += part_rows
    write_result("speed", {"threads": args.threads, "summary": rows, "parts": parts})
    plot(rows, results_dir() / "speed.png")
    for r in rows:
        print(
            f"{r['part']:28s} {r['model']:22s} knsparse {r['knsparse_s']:7.2f} s  {r['competitor']}: "
            f"{r['competitor_s']:7.2f} s  ({r['speedup'] or 0:.2f}x)  {r['quality']}"
        )


if __name__ == "__main__":
    main()
