"""MP fits of whole models: knsparse.spectral vs WeightWatcher ``analyze(mp_fit=True)``, one run.

Layers: every prunable layer of ViT-B/16 (50) and ResNet-50 (54) at their real shapes, with the
models' own random initialisation plus a known number of planted spikes per layer (rank-one
components with singular values 1.5–4x the noise edge), so both the bulk edge and the spike
count have a ground truth. Conv weights are given to both tools as the same 2-D matrix
``[Cout, Cin*kh*kw]`` (WeightWatcher would otherwise split a kxk conv into kh*kw ``[Cout, Cin]``
slices — a different spectrum).

Measured, in the same process:
  * whole-model time: ``knsparse.pruning.spectral.fit_weights`` (fp64 Gram eigenvalues per layer on
    CPU + one batched fit per shape) vs
    ``WeightWatcher.analyze(mp_fit=True)`` on a model of the same matrices (its SVDs, MP grid
    fit and its other per-layer statistics);
  * fit-only time on the same eigenvalues: knsparse's batched fit vs WeightWatcher's ``mp_fit``;
  * the eigenvalue step alone, per layer shape: knsparse's fp64 Gram (BLAS syrk + LAPACK), torch's
    fp64 Gram + ``eigvalsh`` and an fp32 ``svdvals`` — time and largest relative error against an
    fp64 SVD;
  * agreement: relative difference of the singular-value bulk edge ``σ+`` (ours ``√(N λ+)``,
    WeightWatcher ``√bulk_max``), each tool's edge error against the planted truth
    ``σ (√N + √M)``, and the share of layers whose spike count equals the planted count.

Both tools run with the same thread count (``--threads``, default 1: on a shared machine a
single thread is the least noisy setting). Run: ``python bench/bench_spectral.py`` (needs
``pip install weightwatcher``); writes ``bench/results/spectral.json``.
"""

from __future__ import annotations

import argparse
import logging
import math
import time
import warnings
from importlib.metadata import version

import numpy as np
import torch
from _meta import write_result
from threadpoolctl import threadpool_limits
from torch import nn
from tqdm.auto import tqdm

from knsparse.core.layers import prunable_layers, reduction_weight
from knsparse.models import resnet50, vit_base_patch16_224
from knsparse.pruning.spectral import batch_eigenvalues, fit_eigenvalues, fit_weights


def planted_layers(model: nn.Module, max_spikes: int, seed: int) -> tuple[dict, dict, dict]:
    """``(matrices, true sigma², true spike counts)`` per layer: init noise + planted spikes."""
    g = torch.Generator().manual_seed(seed)
    mats, sigma2, spikes = {}, {}, {}
    for i, (name, mod) in enumerate(prunable_layers(model).items()):
        noise = reduction_weight(mod, "crs").double()
        rows, cols = noise.shape
        k = 1 + i % max_spikes
        u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
        s2 = float(noise.var())
        edge = math.sqrt(s2) * (math.sqrt(rows) + math.sqrt(cols))
        strengths = edge * (1.5 + 2.5 * torch.rand(k, generator=g, dtype=torch.float64))
        mats[name] = (noise + (u * strengths) @ v.T).float()
        sigma2[name], spikes[name] = s2, k
    return mats, sigma2, spikes


def as_linear_model(mats: dict[str, torch.Tensor]) -> nn.Module:
    layers = []
    for w in mats.values():
        lin = nn.Linear(w.shape[1], w.shape[0], bias=False)
        lin.weight.data.copy_(w)
        layers.append(lin)
    return nn.Sequential(*layers)


def timed(fn, repeats: int) -> tuple[object, list[float]]:
    times, out = [], None
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return out, times


def summary(xs: list[float]) -> dict[str, float]:
    a = np.asarray(xs, dtype=np.float64)
    return {
        "median": float(np.median(a)),
        "p10": float(np.quantile(a, 0.1)),
        "p90": float(np.quantile(a, 0.9)),
        "max": float(a.max()),
        "n": int(a.size),
    }


def ours_fit_only(mats: dict[str, torch.Tensor], eigs: dict[str, torch.Tensor]) -> dict:
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, w in mats.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)
    fits = {}
    for shape, names in by_shape.items():
        for name, fit in zip(
            names, fit_eigenvalues(torch.stack([eigs[n] for n in names]), shape), strict=True
        ):
            fits[name] = fit
    return fits


def ww_fit_only(watcher, mats: dict[str, torch.Tensor], eigs: dict[str, torch.Tensor]) -> dict[str, float]:
    """WeightWatcher's own MP fit (grid over σ with a KDE refit per point) on our eigenvalues."""
    edges = {}
    for i, (name, w) in enumerate(mats.items()):
        n, m = max(w.shape), min(w.shape)
        evals = (eigs[name] * n).numpy()  # WeightWatcher's eigenvalues are s², not s²/N
        *_, bulk_max, _ = watcher.mp_fit(
            evals, n, m, 1, name, i, i, False, False, "ww-img", "blue", 0.25, True, evals
        )
        edges[name] = math.sqrt(bulk_max)
    return edges


def eigenvalue_routes(mats: dict[str, torch.Tensor], repeats: int) -> dict:
    """Per distinct layer shape: time and accuracy of three ways to the eigenvalues of ``WᵀW/N``
    (knsparse's fp64 Gram via BLAS/LAPACK, torch's fp64 Gram + ``eigvalsh``, the fp32 SVD knsparse
    used before), against an fp64 SVD. ``whole_model_s`` weights each shape by its layer count."""
    by_shape: dict[tuple[int, int], list[str]] = {}
    for name, w in mats.items():
        by_shape.setdefault(tuple(w.shape), []).append(name)

    def torch_gram(w: torch.Tensor) -> torch.Tensor:
        x = w.double()
        return torch.linalg.eigvalsh(x.T @ x if x.shape[0] >= x.shape[1] else x @ x.T) / max(w.shape)

    def fp32_svd(w: torch.Tensor) -> torch.Tensor:
        tall = w if w.shape[0] >= w.shape[1] else w.T
        return (torch.linalg.svdvals(tall).double() ** 2 / max(w.shape)).flip(0)

    routes = {
        "knsparse_fp64_gram_lapack": lambda w: batch_eigenvalues([w])[0],
        "torch_fp64_gram_eigvalsh": torch_gram,
        "torch_fp32_svdvals": fp32_svd,
    }
    rows, total = [], dict.fromkeys(routes, 0.0)
    for shape, names in by_shape.items():
        w = mats[names[0]]
        truth = (torch.linalg.svdvals(w.double()) ** 2 / max(shape)).flip(0)
        row = {"shape": list(shape), "layers": len(names)}
        for route, fn in routes.items():
            eig, times = timed(lambda fn=fn, w=w: fn(w), repeats)
            row[f"{route}_s"] = float(np.median(times))
            row[f"{route}_max_rel_err"] = float(((eig - truth).abs() / truth).max())
            total[route] += len(names) * row[f"{route}_s"]
        rows.append(row)
    return {"whole_model_s": total, "per_shape": rows}


def bench_family(name: str, model: nn.Module, args: argparse.Namespace) -> dict:
    import weightwatcher as ww

    mats, true_s2, true_spikes = planted_layers(model, args.max_spikes, args.seed)
    spectra, t_ours = timed(lambda: fit_weights(mats), args.repeats)
    watcher = ww.WeightWatcher(model=as_linear_model(mats))
    frames, t_ww = timed(lambda: watcher.analyze(mp_fit=True, randomize=False, plot=False), args.ww_repeats)
    frame = frames.sort_values("layer_id")
    if len(frame) != len(mats):
        raise RuntimeError(f"WeightWatcher analysed {len(frame)} layers, expected {len(mats)}")

    eigs = {n: s.eigenvalues for n, s in spectra.items()}
    _, t_fit_ours = timed(lambda: ours_fit_only(mats, eigs), args.repeats)
    ww_edges, t_fit_ww = timed(lambda: ww_fit_only(watcher, mats, eigs), args.ww_repeats)

    routes = eigenvalue_routes(mats, args.repeats)

    rows = []
    for (lname, spec), (_, ww_row) in zip(spectra.items(), frame.iterrows(), strict=True):
        n, m = spec.fit.n, spec.fit.m
        truth = math.sqrt(true_s2[lname]) * (math.sqrt(n) + math.sqrt(m))
        ww_edge = math.sqrt(float(ww_row["bulk_max"]))
        rows.append(
            {
                "layer": lname,
                "shape": list(mats[lname].shape),
                "sigma_plus_knsparse": spec.fit.sigma_plus,
                "sigma_plus_weightwatcher": ww_edge,
                "sigma_plus_weightwatcher_fit_only": ww_edges[lname],
                "sigma_plus_true": truth,
                "spikes_true": true_spikes[lname],
                "spikes_knsparse": spec.fit.num_spikes,
                "spikes_weightwatcher": int(ww_row["num_spikes"]),
                "fit_error_knsparse": spec.fit.fit_error,
            }
        )

    def rel(a: str, b: str) -> dict[str, float]:
        return summary([abs(r[a] - r[b]) / r[b] for r in rows])

    return {
        "layers": len(rows),
        "time_s": {
            "knsparse_whole_model": summary(t_ours),
            "weightwatcher_analyze": summary(t_ww),
            "knsparse_fit_only": summary(t_fit_ours),
            "weightwatcher_fit_only": summary(t_fit_ww),
        },
        "speedup_whole_model": float(np.median(t_ww) / np.median(t_ours)),
        "speedup_fit_only": float(np.median(t_fit_ww) / np.median(t_fit_ours)),
        "edge_rel_diff_knsparse_vs_weightwatcher": rel("sigma_plus_knsparse", "sigma_plus_weightwatcher"),
        "edge_rel_err_knsparse_vs_true": rel("sigma_plus_knsparse", "sigma_plus_true"),
        "edge_rel_err_weightwatcher_vs_true": rel("sigma_plus_weightwatcher", "sigma_plus_true"),
        "spike_count_exact_share": {
            "knsparse": float(np.mean([r["spikes_knsparse"] == r["spikes_true"] for r in rows])),
            "weightwatcher": float(np.mean([r["spikes_weightwatcher"] == r["spikes_true"] for r in rows])),
        },
        "eigenvalue_routes": routes,
        "per_layer": rows,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5, help="timed repeats of knsparse")
    parser.add_argument("--ww-repeats", type=int, default=1, help="timed repeats of WeightWatcher")
    parser.add_argument("--max-spikes", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="BLAS/OpenMP threads for both tools")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)
    logging.getLogger("weightwatcher").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    torch.manual_seed(args.seed)
    results = {}
    families = {"vit_base_patch16_224": vit_base_patch16_224, "resnet50": resnet50}
    for fam, build in tqdm(families.items(), desc="models"):
        results[fam] = bench_family(fam, build(), args)
        r, t = results[fam], results[fam]["time_s"]
        print(
            f"{fam}: {r['layers']} layers, whole model {t['knsparse_whole_model']['median']:.2f}s vs "
            f"WeightWatcher {t['weightwatcher_analyze']['median']:.2f}s ({r['speedup_whole_model']:.1f}x), "
            f"fit only {r['speedup_fit_only']:.1f}x; edge diff median "
            f"{r['edge_rel_diff_knsparse_vs_weightwatcher']['median']:.4f}; exact spike counts "
            f"{r['spike_count_exact_share']}"
        )
    payload = {
        "benchmark": "MP fit of every prunable layer: knsparse.spectral vs WeightWatcher analyze",
        "competitor": {"weightwatcher": version("weightwatcher"), "scipy": version("scipy")},
        "config": vars(args),
        "results": results,
    }
    print(f"wrote {write_result('spectral', payload)}")


if __name__ == "__main__":
    main()
