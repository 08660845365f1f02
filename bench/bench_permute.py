"""Channel-permutation search: knsparse vs a greedy channel-swap baseline, in the same run.

Cases:
* ``apex``: apex ASP's published case — random matrices with 64 input channels and 128 rows
  (``permutation_test.py --channels 64 --filters 128``; uniform [0, 1) entries like
  ``np.random.rand``), pattern 2:4. Target: >= 35% mean efficacy in <= 1 s per matrix.
* ``patterns``: 128 x 96 uniform matrices for 2:4, 6:12, 8:16 and 12:16.
* ``shapes``: ViT-B/16 MLP weights (fc1 [3072, 768], fc2 [768, 3072]) and ResNet-50's 3x3
  convolutions (grouped in (R, S, C) order), Gaussian entries (no pretrained weights can be
  downloaded here), searched with a small tabu budget.

* ``--models``: whole production models (timm ``resnet50`` and ``vit_base_patch16_224``, random
  init; knsparse's built-in models of the same names and shapes where timm does not import),
  ``permute(model, "2:4", calib=[x])`` with its defaults (output checked unchanged), and in the
  same run the greedy swap baseline (``knsparse.pruning.permutation.baseline.greedy_groups``) on one group
  of each distinct shape whose single greedy iteration fits ``BASELINE_MAX_PAIR_ELEMENTS``, capped
  at ``BASELINE_CAP_S`` seconds per group: per-group efficacy and seconds side by side.

apex's own figures are quoted from its documentation as *published*, never as measured here.
Timings are wall-clock medians and quantiles of single-matrix searches.

    python bench/bench_permute.py            # writes bench/results/permute.json and .png
    python bench/bench_permute.py --models --threads 2   # writes bench/results/permute_models.json/.png
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import numpy as np
import torch
from _meta import RESULTS, write_result
from tqdm.auto import tqdm

from knsparse.pruning.permutation import find_groups, permute, search
from knsparse.pruning.permutation.baseline import greedy_groups, greedy_swap_search

# NVIDIA apex, permutation_search_kernels / ChannelPermutations README (Pool & Yu, NeurIPS 2021):
# one random 64-channel x 128-row matrix, 2:4.
APEX_PUBLISHED = {
    "source": "NVIDIA apex ChannelPermutations README (Pool & Yu, 'Channel Permutations for N:M Sparsity', "
    "NeurIPS 2021); published, not measured here",
    "channel_swap,0": {"efficacy": 0.321, "seconds_v100": 0.214, "seconds_cpu": 55.972},
    "optimize_stripe_groups,8,0": {"efficacy": 0.355, "seconds_v100": 0.013, "seconds_cpu": 60.653},
    "optimize_stripe_groups,12,0": {"efficacy": 0.366, "seconds_v100": 0.860},
}


def _stats(values: list[float]) -> dict[str, float]:
    q = statistics.quantiles(values, n=10) if len(values) > 1 else [values[0]] * 9
    return {
        "mean": statistics.fmean(values),
        "median": statistics.median(values),
        "p10": q[0],
        "p90": q[-1],
        "min": min(values),
        "max": max(values),
    }


def _run(name: str, fn, weights: list[torch.Tensor], pattern: str) -> dict:
    """Wall-clock ``seconds`` and process ``cpu_seconds`` (all threads) per matrix: on a shared
    machine the CPU time shows the work, the wall time what this run got."""
    runs = []
    for i, w in enumerate(tqdm(weights, desc=name, leave=False)):
        cpu = time.process_time()
        r = fn(w, pattern, i)
        runs.append(
            {
                "efficacy": r.efficacy,
                "seconds": r.seconds,
                "cpu_seconds": time.process_time() - cpu,
                "kept": r.kept,
                "kept_before": r.kept_before,
            }
        )
    summary = {key: _stats([r[key] for r in runs]) for key in ("efficacy", "seconds", "cpu_seconds")}
    return summary | {"runs": runs}


def _knsparse(max_iters: int):
    return lambda w, p, seed: search(w, p, seed=seed, max_iters=max_iters)


def _baseline(w: torch.Tensor, p: str, _seed: int):
    return greedy_swap_search(w, p)


def _compare(label: str, weights: list[torch.Tensor], pattern: str, max_iters: int, baseline: bool) -> dict:
    out = {"pattern": pattern, "shape": list(weights[0].shape), "matrices": len(weights)}
    out["knsparse"] = _run(f"{label} knsparse", _knsparse(max_iters), weights, pattern)
    out["knsparse"]["max_iters"] = max_iters
    if baseline:
        out["greedy_swap"] = _run(f"{label} greedy swap", _baseline, weights, pattern)
        k, b = out["knsparse"], out["greedy_swap"]
        wall, cpu = "seconds", "cpu_seconds"
        out["ratios"] = {
            "baseline_over_knsparse_median_seconds": b[wall]["median"] / k[wall]["median"],
            "baseline_over_knsparse_median_cpu_seconds": b[cpu]["median"] / k[cpu]["median"],
            "knsparse_minus_baseline_mean_efficacy": k["efficacy"]["mean"] - b["efficacy"]["mean"],
        }
    return out


# The greedy baseline scores every swap from scratch: it runs on one group of each distinct
# search-matrix shape whose single iteration (pairs x rows x n) is at most this many elements,
# with BASELINE_CAP_S seconds per group (checked between swaps).
BASELINE_MAX_PAIR_ELEMENTS = 1 << 32
BASELINE_CAP_S = 10.0


def build_model(name: str) -> tuple[torch.nn.Module, str]:
    """timm's model (random init) when timm imports, else knsparse's model of that name."""
    torch.manual_seed(0)
    try:
        import timm

        return timm.create_model(name, pretrained=False).eval(), f"timm {timm.__version__}"
    except ImportError:
        from knsparse import models

        return getattr(models, name)().eval(), "knsparse.models (timm does not import here)"


def _group_rows(model: torch.nn.Module, consumers: list[str]) -> int:
    """Rows of a group's search matrix: every consumer's weight elements per input channel."""
    return sum(
        model.get_submodule(c).weight.numel() // model.get_submodule(c).weight.shape[1] for c in consumers
    )


def _baseline_subset(model: torch.nn.Module, groups: list) -> list[str]:
    """One permuted group per distinct (rows, channels, head size) whose greedy iteration fits."""
    chosen, seen = [], set()
    for g in groups:
        rows, seg = _group_rows(model, g.consumers), g.segment
        pairs = g.channels * g.channels // 2 // (g.channels // seg if seg else 1)
        key = (rows, g.channels, seg)
        if key not in seen and pairs * rows * 4 <= BASELINE_MAX_PAIR_ELEMENTS:
            seen.add(key)
            chosen.append(g.name)
    return chosen


def models_case(names: list[str], baseline: bool = True) -> dict:
    """Each model: ``permute(model, "2:4", calib=[x])`` with its defaults (output checked unchanged),
    then the greedy swap baseline on a subset of the same groups, per group side by side."""
    out = {}
    for name in tqdm(names, desc="models"):
        model, source = build_model(name)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0))
        wall, cpu = time.perf_counter(), time.process_time()
        report = permute(model, "2:4", calib=[x], inplace=True)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        effs = [g.efficacy for g in report.permuted]
        mlp = [g.efficacy for g in report.permuted if all(c.endswith("mlp.fc2") for c in g.consumers)]
        before = sum(g.kept_before for g in report.permuted)
        headroom = sum(g.kept_optimal for g in report.permuted) - before
        model, _ = build_model(name)  # the baseline starts from the same weights
        heads = {g.name: g for g in find_groups(model).groups}
        permuted = [
            SimpleNamespace(
                name=g.name, consumers=g.consumers, channels=g.channels, segment=heads[g.name].block
            )
            for g in report.permuted
        ]
        subset = _baseline_subset(model, permuted) if baseline else []
        base = {
            b.report.name: b
            for b in (
                greedy_groups(model, "2:4", names=subset, time_budget_s=BASELINE_CAP_S) if subset else []
            )
        }
        side = []
        for g in report.permuted:
            row = {
                "group": g.name,
                "rows": _group_rows(model, g.consumers),
                "channels": g.channels,
                "knsparse_efficacy": g.efficacy,
                "knsparse_seconds_share": g.seconds,
            }
            if g.name in base:
                b = base[g.name]
                row |= {
                    "greedy_efficacy": b.report.efficacy,
                    "greedy_seconds": b.seconds,
                    "greedy_swaps": b.swaps,
                    "greedy_capped": b.capped,
                }
            side.append(row)
        compared = [r for r in side if "greedy_efficacy" in r]
        out[name] = {
            "source": source,
            "knsparse_defaults": {
                "groups": len(report.groups),
                "groups_permuted": len(effs),
                "mean_efficacy": statistics.fmean(effs) if effs else 0.0,
                # Transformer MLP hidden groups (fc1 -> fc2) only: the groups found before the
                # residual stream and attention values were covered.
                "mean_efficacy_mlp_hidden_groups": statistics.fmean(mlp) if mlp else None,
                # Size-weighted: the fraction of the headroom (optimal minus unpermuted kept |w|,
                # summed over all permuted groups' consumers) that the permutations recovered.
                "weighted_efficacy": (sum(g.kept_after for g in report.permuted) - before) / headroom
                if headroom > 0
                else 0.0,
                "largest_group": max(
                    (
                        {"group": g.name, "rows": _group_rows(model, g.consumers), "efficacy": g.efficacy}
                        for g in report.permuted
                    ),
                    key=lambda r: r["rows"],
                    default=None,
                ),
                "kept_gain": sum(g.kept_after - g.kept_before for g in report.permuted),
                "seconds": wall,
                "cpu_seconds": cpu,
                "threads": torch.get_num_threads(),
                "function_checked": True,
            },
            "greedy_baseline": {
                "cap_seconds_per_group": BASELINE_CAP_S,
                "max_pair_elements": BASELINE_MAX_PAIR_ELEMENTS,
                "groups_run": len(compared),
                "mean_efficacy": statistics.fmean(r["greedy_efficacy"] for r in compared)
                if compared
                else None,
                "knsparse_mean_efficacy_same_groups": (
                    statistics.fmean(r["knsparse_efficacy"] for r in compared) if compared else None
                ),
                "seconds": sum(r["greedy_seconds"] for r in compared),
            },
            "groups": side,
        }
    return out


def _plot_models(result: dict, path: Path) -> None:
    fig, axes = plt.subplots(1, len(result), figsize=(6 * len(result), 4.4))
    for ax, (name, r) in zip(np.atleast_1d(axes), result.items(), strict=True):
        rows = r["groups"]
        xs = range(len(rows))
        ax.bar(
            xs, [100 * g["knsparse_efficacy"] for g in rows], color="C0", label="knsparse permute() defaults"
        )
        pairs = [(i, g) for i, g in enumerate(rows) if "greedy_efficacy" in g]
        ax.scatter(
            [i for i, _ in pairs],
            [100 * g["greedy_efficacy"] for _, g in pairs],
            color="C1",
            zorder=3,
            label=f"greedy swap baseline (<= {BASELINE_CAP_S:.0f} s/group)",
        )
        k = r["knsparse_defaults"]
        ax.set_title(
            f"{name}: {k['groups_permuted']}/{k['groups']} groups, mean {k['mean_efficacy']:.1%}, "
            f"{k['seconds']:.1f} s wall",
            fontsize=8,
        )
        ax.set_xlabel("channel group (model order)")
        ax.set_ylabel("efficacy (%)")
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _uniform(rows: int, channels: int, seed: int) -> torch.Tensor:
    return torch.rand(rows, channels, generator=torch.Generator().manual_seed(seed))


def _gaussian(shape: tuple[int, ...], seed: int) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed))


def _plot(apex: dict, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7.5, 4.6))
    measured = (("knsparse", "o", "C0", "knsparse"), ("greedy_swap", "s", "C1", "greedy swap"))
    for key, marker, color, label in measured:
        runs = apex[key]["runs"]
        effs = [100 * r["efficacy"] for r in runs]
        ax.scatter(
            [r["seconds"] for r in runs], effs, marker=marker, color=color, label=f"{label}, wall (measured)"
        )
        ax.scatter(
            [r["cpu_seconds"] for r in runs],
            effs,
            marker=marker,
            facecolors="none",
            edgecolors=color,
            label=f"{label}, CPU time (measured)",
        )
    for name, pub in APEX_PUBLISHED.items():
        if name == "source":
            continue
        for dev in ("seconds_cpu", "seconds_v100"):
            if dev in pub:
                ax.scatter(pub[dev], 100 * pub["efficacy"], marker="x", color="grey")
                ax.annotate(
                    f"apex {name}\n({dev[8:]}, published)", (pub[dev], 100 * pub["efficacy"]), fontsize=6
                )
    ax.set_xscale("log")
    ax.set_xlim(5e-3, 1e3)
    ax.set_xlabel("seconds per matrix (log)")
    ax.set_ylabel("efficacy (%)")
    ax.axhline(35, color="red", linewidth=0.6, linestyle="--")
    ax.axvline(1, color="red", linewidth=0.6, linestyle="--")
    ax.set_title("2:4 permutation search: 64 channels x 128 rows, uniform random", fontsize=9)
    ax.legend(fontsize=6, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    parser.add_argument("--matrices", type=int, default=10, help="random matrices in the apex case")
    parser.add_argument("--max-iters", type=int, default=1000, help="knsparse tabu steps per block")
    parser.add_argument("--shape-iters", type=int, default=100, help="tabu steps per block, large shapes")
    parser.add_argument("--replot", action="store_true", help="only redraw the PNG from the JSON")
    parser.add_argument("--models", action="store_true", help="whole ResNet-50 and ViT-B/16 only")
    parser.add_argument(
        "--no-baseline", action="store_true", help="--models without the greedy baseline (minutes faster)"
    )
    args = parser.parse_args()
    if args.models:
        torch.set_num_threads(args.threads)
        load_start = os.getloadavg()[0]
        result = models_case(["resnet50", "vit_base_patch16_224"], baseline=not args.no_baseline)
        write_result("permute_models", {"load_average_1min_start": load_start, "models": result})
        _plot_models(result, RESULTS / "permute_models.png")
        for name, r in result.items():
            e, b = r["knsparse_defaults"], r["greedy_baseline"]
            ours, theirs = b["knsparse_mean_efficacy_same_groups"] or 0, b["mean_efficacy"] or 0
            print(
                f"{name}: {e['groups_permuted']}/{e['groups']} groups, mean efficacy "
                f"{e['mean_efficacy']:.1%} (size-weighted {e['weighted_efficacy']:.1%}), "
                f"{e['seconds']:.1f} s wall, {e['cpu_seconds']:.1f} s CPU; "
                f"greedy baseline on {b['groups_run']} groups: {theirs:.1%} (knsparse {ours:.1%}) "
                f"in {b['seconds']:.1f} s"
            )
        return
    if args.replot:
        _plot(json.loads((RESULTS / "permute.json").read_text())["apex_case"], RESULTS / "permute.png")
        return
    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()[0]

    apex = _compare("apex", [_uniform(128, 64, s) for s in range(args.matrices)], "2:4", args.max_iters, True)
    apex["published_apex"] = APEX_PUBLISHED
    apex["target"] = {"mean_efficacy_at_least": 0.35, "median_seconds_at_most": 1.0}
    ours = apex["knsparse"]
    apex["target_met"] = {
        "wall_clock": ours["efficacy"]["mean"] >= 0.35 and ours["seconds"]["median"] <= 1.0,
        "cpu_time": ours["efficacy"]["mean"] >= 0.35 and ours["cpu_seconds"]["median"] <= 1.0,
    }

    patterns = {
        p: _compare(p, [_uniform(128, 96, 100 + s) for s in range(3)], p, args.max_iters, True)
        for p in ("2:4", "6:12", "8:16", "12:16")
    }

    shapes = {}
    cases = {
        "vit_b16.mlp.fc1 [3072, 768]": (3072, 768),
        "vit_b16.mlp.fc2 [768, 3072]": (768, 3072),
        "resnet50.layer1.conv2 [64, 64, 3, 3]": (64, 64, 3, 3),
        "resnet50.layer2.conv2 [128, 128, 3, 3]": (128, 128, 3, 3),
        "resnet50.layer3.conv2 [256, 256, 3, 3]": (256, 256, 3, 3),
        "resnet50.layer4.conv2 [512, 512, 3, 3]": (512, 512, 3, 3),
    }
    for i, (label, shape) in enumerate(tqdm(cases.items(), desc="shapes")):
        w = [_gaussian(shape, 200 + i)]
        shapes[label] = {
            "greedy_rounds_only": _compare(label, w, "2:4", 0, False),
            "with_tabu": _compare(label, w, "2:4", args.shape_iters, shape[1] <= 64),
        }

    payload = {
        "benchmark": "permutation search",
        "load_average_1min": {"start": load_start, "end": os.getloadavg()[0]},
        "apex_case": apex,
        "patterns": patterns,
        "shapes": shapes,
    }
    write_result("permute", payload)
    _plot(apex, RESULTS / "permute.png")
    k, b = apex["knsparse"], apex["greedy_swap"]
    print(
        f"apex case: knsparse efficacy {k['efficacy']['mean']:.1%} "
        f"(median {k['seconds']['median']:.2f} s wall, "
        f"{k['cpu_seconds']['median']:.2f} s CPU), greedy swap {b['efficacy']['mean']:.1%} "
        f"(median {b['seconds']['median']:.2f} s wall, {b['cpu_seconds']['median']:.2f} s CPU); "
        f"target met: {apex['target_met']}"
    )
    for p, r in patterns.items():
        ours, theirs = r["knsparse"]["efficacy"]["mean"], r["greedy_swap"]["efficacy"]["mean"]
        print(f"{p}: knsparse {ours:.1%} vs greedy swap {theirs:.1%}")
    for label, r in shapes.items():
        t = r["with_tabu"]["knsparse"]
        g = r["greedy_rounds_only"]["knsparse"]
        print(
            f"{label}: greedy rounds {g['efficacy']['mean']:.1%} in {g['seconds']['median']:.1f} s; "
            f"+tabu {t['efficacy']['mean']:.1%} in {t['seconds']['median']:.1f} s"
        )


if __name__ == "__main__":
    main()
