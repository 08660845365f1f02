"""Whole-model YOPO saliency: knsparse vs scikit-learn's NMF(solver="mu") loop vs a plain torch loop.

Every Linear / Conv2d weight of a randomly initialised ResNet-50 and ViT-B/16 is scored the YOPO
way (``X = |W|`` in its reduction view, divided by its median; rank-r NMF by multiplicative
updates; residual ``|X - V H|``). In the same process, on the same matrices, with the same rank
and iteration count:

* ``knsparse``: ``knsparse.pruning.score.yopo(model)`` end to end (bucketing, batched NMF, residual);
* ``knsparse_reference``: the same call on the batched-``bmm`` PyTorch reference (``KNSPARSE_NATIVE=0``);
* ``sklearn``: ``NMF(rank, solver="mu", init="random", max_iter=iters, tol=0)`` per layer, then
  the residual (the ``X`` matrices are prepared outside the timed region, a head start for it);
* ``torch_loop``: the same updates per layer with ``torch.mm`` in fp32, then the residual.

Reports medians and quantiles of wall time, time ratios against knsparse, and the mean relative
reconstruction error ``||X - V H||_F / ||X||_F`` of each method. With a CUDA device it also times
a whole ResNet-18 (Triton kernels vs the reference on the GPU vs the sklearn loop).

    python bench/bench_yopo.py                 # rank 7, 200 iterations, 3 repetitions
    python bench/bench_yopo.py --quick         # 50 iterations, 1 repetition
    python bench/bench_yopo.py --iters 100 --reps 5 --models resnet50
    python bench/bench_yopo.py --single-shot   # fresh process per call: ResNet-18 shapes, ViT-B/16

``--single-shot`` answers what a user sees: every measurement is a new Python process that builds
the model and makes one call (``yopo(model)`` or the scikit-learn loop), so one-time costs (kernel
loading, lazy imports, thread start-up) are inside the timed region; processes alternate
between the methods. The C kernel's one-time build per machine (cached on disk) happens first,
outside the timed processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from _meta import write_result
from sklearn.decomposition import NMF
from sklearn.exceptions import ConvergenceWarning
from threadpoolctl import threadpool_info
from torch import nn
from tqdm.auto import tqdm

from knsparse.core.masks import to_reduction_view
from knsparse.kernels import nmf_cpu
from knsparse.kernels.nmf import nmf_init, nmf_ref, nmf_triton
from knsparse.models import resnet50, vit_base_patch16_224
from knsparse.pruning.score import prunable_weights, yopo
from knsparse.pruning.score.buckets import plan_chunks
from knsparse.pruning.score.yopo import DEFAULT_MAX_CHUNK_BYTES, LayerFits, _layer_seed, _median_scale

EPS = 1e-8


def resnet18_layers() -> nn.Module:
    """The conv / fc shapes of torchvision's ResNet-18 (basic blocks), Kaiming-initialised."""
    layers: dict[str, nn.Module] = {"conv1": nn.Conv2d(3, 64, 7)}
    cin = 64
    for stage, width in enumerate((64, 128, 256, 512), start=1):
        for block in range(2):
            layers[f"layer{stage}.{block}.conv1"] = nn.Conv2d(cin, width, 3)
            layers[f"layer{stage}.{block}.conv2"] = nn.Conv2d(width, width, 3)
            if block == 0 and cin != width:
                layers[f"layer{stage}.{block}.downsample"] = nn.Conv2d(cin, width, 1)
            cin = width
    layers["fc"] = nn.Linear(512, 1000)
    return nn.ModuleDict({k.replace(".", "_"): v for k, v in layers.items()})


def host() -> dict:
    """What the shared provenance block leaves out but CPU timings depend on."""
    cpu = platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu_model": cpu,
        "cpu_count": os.cpu_count(),
        "load_average_1_5_15min": list(os.getloadavg()),
        "blas": [
            {k: d.get(k) for k in ("internal_api", "version", "num_threads")} for d in threadpool_info()
        ],
    }


def matrices(model: nn.Module) -> dict[str, torch.Tensor]:
    """What yopo fits: ``|W|`` in its reduction view divided by the layer's median."""
    return {
        name: to_reduction_view(w.abs().float()) / _median_scale(w)
        for name, w in prunable_weights(model).items()
    }


def rel_err(residual: torch.Tensor | np.ndarray, x: torch.Tensor | np.ndarray) -> float:
    return float(np.linalg.norm(np.asarray(residual)) / np.linalg.norm(np.asarray(x)))


class Timer:
    """Wall time and process CPU time (all threads) of a block."""

    def __enter__(self) -> Timer:
        self.wall, self.cpu = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc) -> None:
        self.wall, self.cpu = time.perf_counter() - self.wall, time.process_time() - self.cpu


def run_knsparse(
    model: nn.Module, mats: dict[str, torch.Tensor], rank: int, iters: int
) -> tuple[Timer, list]:
    with Timer() as t:
        scores = yopo(model, rank=rank, iters=iters)
    return t, [rel_err(to_reduction_view(scores[name]), x) for name, x in mats.items()]


def run_knsparse_reference(model, mats, rank, iters) -> tuple[Timer, list]:
    os.environ["KNSPARSE_NATIVE"] = "0"
    try:
        return run_knsparse(model, mats, rank, iters)
    finally:
        os.environ["KNSPARSE_NATIVE"] = "1"


def run_sklearn(model, mats, rank, iters) -> tuple[Timer, list]:
    arrays = {name: x.numpy() for name, x in mats.items()}
    residuals = {}
    with Timer() as t:
        for name, x in arrays.items():
            est = NMF(rank, solver="mu", init="random", max_iter=iters, tol=0, random_state=0)
            w = est.fit_transform(x)
            residuals[name] = np.abs(x - w @ est.components_)
    return t, [rel_err(residuals[name], arrays[name]) for name in arrays]


def run_torch_loop(model, mats, rank, iters) -> tuple[Timer, list]:
    residuals = {}
    with Timer() as t:
        for name, x in mats.items():
            v, h = nmf_init(x[None], rank, torch.Generator().manual_seed(_layer_seed(0, name)))
            v, h = v[0], h[0]
            for _ in range(iters):
                v.mul_((x @ h.T).div_((v @ (h @ h.T)).add_(EPS)))
                h.mul_((v.T @ x).div_(((v.T @ v) @ h).add_(EPS)))
            residuals[name] = (x - v @ h).abs_()
    return t, [rel_err(residuals[name], mats[name]) for name in mats]


METHODS = {
    "knsparse": run_knsparse,
    "knsparse_reference": run_knsparse_reference,
    "sklearn": run_sklearn,
    "torch_loop": run_torch_loop,
}


SINGLE_SHOT_MODELS = {
    "resnet18": resnet18_layers,
    "resnet50": resnet50,
    "vit_base_patch16_224": vit_base_patch16_224,
}


def single_shot_worker(model_name: str, method: str, rank: int, iters: int) -> None:
    """Body of one fresh process: build the model, time one call of ``method``, print JSON."""
    warnings.filterwarnings("ignore", category=ConvergenceWarning)
    torch.manual_seed(0)
    model = SINGLE_SHOT_MODELS[model_name]()
    mats = matrices(model)
    timer, errs = METHODS[method](model, mats, rank, iters)
    print(
        json.dumps({"wall_s": timer.wall, "cpu_s": timer.cpu, "mean_rel_recon_error": float(np.mean(errs))})
    )


def bench_single_shot(models: list[str], rank: int, iters: int, reps: int) -> dict:
    """knsparse vs scikit-learn, each measurement one call in a fresh process (alternating)."""
    methods = ("knsparse", "sklearn")
    # The C kernel compiles once per machine (cached on disk); what a process pays is loading it.
    nmf_cpu.native_available(rank)
    out = {}
    for model_name in models:
        runs: dict[str, list[dict]] = {m: [] for m in methods}
        steps = [(rep, m) for rep in range(reps) for m in methods]
        for _, method in tqdm(steps, desc=f"{model_name} single-shot", unit="process"):
            cmd = [sys.executable, __file__, "--worker", model_name, method, "--rank", str(rank)]
            done = subprocess.run([*cmd, "--iters", str(iters)], capture_output=True, text=True, check=True)
            runs[method].append(json.loads(done.stdout.strip().splitlines()[-1]))
        entry = {
            m: {
                **summary([r["wall_s"] for r in runs[m]]),
                "wall_s": [r["wall_s"] for r in runs[m]],
                **summary([r["cpu_s"] for r in runs[m]], "cpu_s"),
                "mean_rel_recon_error": runs[m][0]["mean_rel_recon_error"],
            }
            for m in methods
        }
        ours, sk = entry["knsparse"], entry["sklearn"]
        out[model_name] = {
            "methods": entry,
            "speedup_vs_sklearn": sk["median_s"] / ours["median_s"],
            "recon_error_rel_diff_vs_sklearn": (ours["mean_rel_recon_error"] - sk["mean_rel_recon_error"])
            / sk["mean_rel_recon_error"],
        }
    return out


def single_shot_result(models: list[str], rank: int, iters: int, reps: int) -> dict:
    """The single-shot comparison with the host's state before and after."""
    before = host()
    return {
        "benchmark": "yopo single-shot: one whole-model call in a fresh process",
        "rank": rank,
        "iters": iters,
        "reps": reps,
        "host_before": before,
        "single_shot": bench_single_shot(models, rank, iters, reps),
        "host_after": host(),
    }


def summary(times: list[float], unit: str = "s") -> dict:
    q = np.percentile(times, [0, 25, 50, 75, 100])
    names = ("min", "p25", "p50", "p75", "max")
    return {f"median_{unit}": float(q[2]), f"quantiles_{unit}": dict(zip(names, q.tolist(), strict=True))}


def bench_cpu(models: list[str], rank: int, iters: int, reps: int) -> dict:
    builders = SINGLE_SHOT_MODELS
    out = {}
    for model_name in models:
        torch.manual_seed(0)
        model = builders[model_name]()
        mats = matrices(model)
        wall: dict[str, list[float]] = {m: [] for m in METHODS}
        cpu: dict[str, list[float]] = {m: [] for m in METHODS}
        errors: dict[str, list[float]] = {}
        steps = [(rep, m) for rep in range(reps) for m in METHODS]  # interleaved repetitions
        for _, method in tqdm(steps, desc=model_name, unit="run"):
            timer, errs = METHODS[method](model, mats, rank, iters)
            wall[method].append(timer.wall)
            cpu[method].append(timer.cpu)
            errors[method] = errs
        methods = {
            m: {
                **summary(wall[m]),
                "wall_s": wall[m],
                **summary(cpu[m], "cpu_s"),
                "mean_rel_recon_error": float(np.mean(errors[m])),
            }
            for m in METHODS
        }
        ours, sk = methods["knsparse"], methods["sklearn"]
        out[model_name] = {
            "layers": len(mats),
            "weights": sum(x.numel() for x in mats.values()),
            "methods": methods,
            "speedup_vs_sklearn": sk["median_s"] / ours["median_s"],
            "speedup_vs_torch_loop": methods["torch_loop"]["median_s"] / ours["median_s"],
            "speedup_vs_reference": methods["knsparse_reference"]["median_s"] / ours["median_s"],
            "torch_loop_speedup_vs_sklearn": sk["median_s"] / methods["torch_loop"]["median_s"],
            "cpu_time_ratio_sklearn_over_knsparse": sk["median_cpu_s"] / ours["median_cpu_s"],
            "recon_error_rel_diff_vs_sklearn": (ours["mean_rel_recon_error"] - sk["mean_rel_recon_error"])
            / sk["mean_rel_recon_error"],
        }
    return out


def bench_gpu(rank: int, iters: int, reps: int) -> dict:
    """Whole ResNet-18 on the GPU: yopo end to end (Triton), NMF stage Triton vs reference, sklearn."""
    torch.manual_seed(0)
    model = resnet18_layers()
    mats = matrices(model)
    gpu_model = model.cuda()
    yopo(gpu_model, rank=rank, iters=2)  # compile the Triton kernels
    end_to_end = []
    for _ in range(max(reps, 5)):
        torch.cuda.synchronize()
        start = time.perf_counter()
        yopo(gpu_model, rank=rank, iters=iters)
        torch.cuda.synchronize()
        end_to_end.append(time.perf_counter() - start)
    fits = LayerFits(prunable_weights(gpu_model), rank, False, True, 0, "rsc")
    buckets = [fits.inputs(c) for c in plan_chunks(fits.problems, DEFAULT_MAX_CHUNK_BYTES)]
    stage = {}
    for name, fn in (("triton", nmf_triton), ("reference", nmf_ref)):
        fn(*buckets[0], iters=2)
        runs = []
        for _ in range(max(reps, 5)):
            torch.cuda.synchronize()
            start = time.perf_counter()
            for bucket in buckets:
                fn(*bucket, iters=iters)
            torch.cuda.synchronize()
            runs.append(time.perf_counter() - start)
        stage[name] = summary(runs)
    sk_times = [
        run_sklearn(model, {k: v.cpu() for k, v in mats.items()}, rank, iters)[0].wall for _ in range(reps)
    ]
    yopo_s = summary(end_to_end)
    return {
        "model": "resnet18 (torchvision shapes, random init)",
        "yopo_end_to_end": yopo_s,
        "target_s": 0.3,
        "meets_target": yopo_s["median_s"] < 0.3,
        "published_yopo_s": 3.29,
        "nmf_stage": stage,
        "sklearn_cpu": summary(sk_times),
        "speedup_vs_sklearn": summary(sk_times)["median_s"] / yopo_s["median_s"],
        "triton_speedup_vs_reference": stage["reference"]["median_s"] / stage["triton"]["median_s"],
    }


def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(result["cpu"])
    fig, axes = plt.subplots(1, len(models), figsize=(5.5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        entry = result["cpu"][model]
        names = list(entry["methods"])
        medians = [entry["methods"][n]["median_s"] for n in names]
        bars = ax.bar(names, medians, color=["tab:green", "tab:olive", "tab:red", "tab:blue"])
        for bar, n in zip(bars, names, strict=True):
            ratio = entry["methods"][n]["median_s"] / entry["methods"]["knsparse"]["median_s"]
            ax.annotate(
                f"{ratio:.2f}x",
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
            )
        ax.set_title(f"{model}: rank {result['rank']}, {result['iters']} iterations")
        ax.set_ylabel("wall time, median [s]")
        ax.tick_params(axis="x", labelrotation=15)
    fig.suptitle(f"YOPO saliency, whole model, {result['host_before']['cpu_model']}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="50 iterations, 1 repetition")
    parser.add_argument("--iters", type=int, default=None, help="NMF iterations (default 200, quick 50)")
    parser.add_argument("--reps", type=int, default=None, help="repetitions per method (default 3, quick 1)")
    parser.add_argument("--rank", type=int, default=7)
    parser.add_argument(
        "--models",
        nargs="+",
        default=None,
        choices=list(SINGLE_SHOT_MODELS),
        help="default: resnet50 vit_base_patch16_224 (single-shot: resnet18 vit_base_patch16_224)",
    )
    parser.add_argument("--single-shot", action="store_true", help="one call per fresh process")
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "METHOD"), help=argparse.SUPPRESS)
    parser.add_argument("--name", default=None, help="writes bench/results/<name>.json and .png")
    args = parser.parse_args()
    iters = args.iters or (50 if args.quick else 200)
    reps = args.reps or (1 if args.quick else 3)
    if args.worker:
        single_shot_worker(*args.worker, args.rank, iters)
        return
    if args.single_shot:
        result = single_shot_result(
            args.models or ["resnet18", "vit_base_patch16_224"], args.rank, iters, reps
        )
        path = write_result(args.name or "yopo_single_shot", result)
        for model, entry in result["single_shot"].items():
            m = entry["methods"]
            print(
                f"{model} single-shot: knsparse {m['knsparse']['median_s']:.2f}s, sklearn "
                f"{m['sklearn']['median_s']:.2f}s ({entry['speedup_vs_sklearn']:.2f}x), recon error "
                f"{100 * entry['recon_error_rel_diff_vs_sklearn']:+.2f}% vs sklearn"
            )
        print(f"wrote {path}")
        return
    warnings.filterwarnings("ignore", category=ConvergenceWarning)  # tol=0: max_iter is the point

    # Warm-up: the C kernel compiles once per machine; later calls load it from the disk cache.
    small = nn.Sequential(nn.Linear(32, 16))
    for method in METHODS.values():
        method(small, matrices(small), args.rank, 2)

    result = {
        "benchmark": "yopo whole-model saliency",
        "rank": args.rank,
        "iters": iters,
        "reps": reps,
        "host_before": host(),
        "cpu": bench_cpu(args.models or ["resnet50", "vit_base_patch16_224"], args.rank, iters, reps),
    }
    if torch.cuda.is_available():
        result["gpu"] = bench_gpu(args.rank, iters, reps)
    result["host_after"] = host()
    path = write_result(args.name or "yopo", result)
    plot(result, path.with_suffix(".png"))
    for model, entry in result["cpu"].items():
        m = entry["methods"]
        print(
            f"{model}: knsparse {m['knsparse']['median_s']:.2f}s, sklearn {m['sklearn']['median_s']:.2f}s "
            f"({entry['speedup_vs_sklearn']:.2f}x), torch loop {m['torch_loop']['median_s']:.2f}s "
            f"({entry['speedup_vs_torch_loop']:.2f}x), reference {m['knsparse_reference']['median_s']:.2f}s"
        )
        print(
            f"  recon error {m['knsparse']['mean_rel_recon_error']:.4f} vs sklearn "
            f"{m['sklearn']['mean_rel_recon_error']:.4f} "
            f"({100 * entry['recon_error_rel_diff_vs_sklearn']:+.2f}%)"
        )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
