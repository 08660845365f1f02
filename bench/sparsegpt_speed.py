"""SparseGPT 2:4 speed on a ViT-B/16-shaped model (86 M parameters, random weights) on the CPU.

Two measurements in one run:

* the whole model through the public API: ``knsparse.prune(model.blocks, method, "2:4",
  calib=tokens)`` with ``"sparsegpt"`` and ``"sparsegpt-refit"`` (the default k:n method) on the
  12 blocks of ``knsparse.models.vit_base_patch16_224`` (their input tokens for 16 images at
  224 px, 3152 GEMM rows per layer): full calibration Grams of every prunable layer
  (memory-bounded passes), damping, inverse Cholesky, the sweep, the re-fit, the output error,
  plus what ``prune`` does for every method (MP fits of the weight spectra, the certificate's
  calibration pass). The same call with ``"magnitude"`` (same calibration set) measures that
  shared part, so the difference is the cost of SparseGPT (and its re-fit) itself;
* per ViT-B/16 layer shape (qkv, proj, fc1, fc2): the blocked sweep
  (:func:`knsparse.pruning.methods.obs.sparsegpt_sweep`, lazy block updates) against the straightforward
  reference (:func:`knsparse.pruning.methods.obs.sparsegpt_sweep_ref`, every OBS update applied to all
  remaining columns at once), medians of ``--repeats`` runs (the reference: one run), with the
  largest difference of their results and the number of mask entries where they differ (float32:
  rounding flips near-ties); and the least-squares re-fit in that mask that ``"sparsegpt-refit"``
  (the default k:n method) adds: knsparse's batched conjugate gradients started from the sweep
  (:func:`knsparse.pruning.methods.obs.refit_in_mask_cg`) against the exact reference
  (:func:`knsparse.pruning.methods.obs.refit_in_mask`, one run: ``out`` Cholesky systems of size
  ``K·k/n``), with the relative output error of the sweep, the CG re-fit and the exact re-fit.
  The layer inputs are correlated Gaussians with 1% of the features 30x larger (outlier features,
  as in trained transformers). x12 blocks = the whole model's share.

Writes ``bench/results/sparsegpt_speed.{json,png}``. Run: ``python bench/sparsegpt_speed.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable

import torch
from _meta import RESULTS, write_result
from tqdm.auto import tqdm

from knsparse.core.pattern import Pattern
from knsparse.models import vit_base_patch16_224
from knsparse.pruning.methods.obs import (
    damped,
    inverse_cholesky,
    refit_in_mask,
    refit_in_mask_cg,
    relative_output_error,
    sparsegpt_sweep,
    sparsegpt_sweep_ref,
)
from knsparse.pruning.prune import prune

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}
BLOCKS = 12
LIMIT_S = 120.0
"""The issue's bound for SparseGPT on a ViT-B/16-shaped model on 2 CPU cores."""


def timed(fn: Callable[[], object], repeats: int) -> tuple[float, object]:
    """Median seconds of ``repeats`` calls and the last result."""
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def layer_inputs(k: int) -> torch.Tensor:
    """``[4K, K]`` correlated Gaussian GEMM input rows, 1% of the features 30x larger."""
    scale = torch.ones(k)
    scale[torch.randperm(k)[: max(1, k // 100)]] = 30.0
    return (torch.randn(4 * k, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k) / k**0.5)) * scale


def sweeps(pattern: Pattern, repeats: int) -> list[dict]:
    """Blocked sweep vs the column-by-column reference, and the CG re-fit vs the exact one, on
    each ViT-B/16 layer shape."""
    out = []
    for name, (rows, k) in tqdm(SHAPES.items(), desc="sweep vs reference"):
        w = torch.randn(rows, k) * 0.02
        x = layer_inputs(k)
        h = damped(x.T @ x / x.shape[0], 0.01, name)
        u = inverse_cholesky(h, name)
        blocked, (mask_b, new_b) = timed(lambda w=w, u=u: sparsegpt_sweep(w, u, pattern), repeats)
        ref, (mask_r, new_r) = timed(lambda w=w, u=u: sparsegpt_sweep_ref(w, u, pattern), 1)
        cg, new_cg = timed(lambda w=w, h=h, m=mask_b, s=new_b: refit_in_mask_cg(w, h, m, s), repeats)
        exact, new_exact = timed(lambda w=w, h=h, m=mask_b: refit_in_mask(w, h, m), 1)
        errors = {
            label: relative_output_error(w, v, h)
            for label, v in (("sweep", new_b), ("refit_cg", new_cg), ("refit_exact", new_exact))
        }
        out.append(
            {
                "layer": name,
                "shape": [rows, k],
                "blocked_s": blocked,
                "reference_s": ref,
                "speedup": ref / blocked,
                "mask_entries_differing": int((mask_b != mask_r).sum()),
                "max_abs_diff": float((new_b - new_r).abs().max()),
                "refit_cg_s": cg,
                "refit_exact_s": exact,
                "refit_speedup": exact / cg,
                "output_error": errors,
                "refit_gap_closed": (errors["sweep"] - errors["refit_cg"])
                / max(errors["sweep"] - errors["refit_exact"], 1e-300),
            }
        )
        tqdm.write(str(out[-1]))
    return out


def whole_model(images: int) -> dict[str, float]:
    """Seconds of ``knsparse.prune`` (magnitude, sparsegpt, sparsegpt-refit) on the 12 transformer
    blocks of the ViT-B/16-shaped model (its
    48 block Linears; the classifier head sees one token per image, too few rows for its Gram at
    this calibration size) per method, same calibration set: the blocks' input tokens."""
    torch.manual_seed(0)
    model = vit_base_patch16_224().eval()
    tokens: list[torch.Tensor] = []
    hook = model.blocks.register_forward_pre_hook(lambda _, args: tokens.append(args[0]))
    with torch.no_grad():
        for batch in torch.randn(images, 3, 224, 224).split(8):
            model(batch)
    hook.remove()
    seconds = {}
    for method in ("magnitude", "sparsegpt", "sparsegpt-refit"):
        start = time.perf_counter()
        result = prune(model.blocks, method, "2:4", calib=tokens, progress=True)
        seconds[method] = time.perf_counter() - start
        tqdm.write(f"prune {method}: {seconds[method]:.1f} s, {len(result.masks)} layers")
    return seconds


def plot(payload: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.8))
    rows = payload["sweeps"]
    names = [r["layer"] for r in rows]
    at = range(len(rows))
    bars = {
        "sweep, reference (column by column)": "reference_s",
        "sweep, knsparse (blocked)": "blocked_s",
        "re-fit, reference (exact Cholesky per row)": "refit_exact_s",
        "re-fit, knsparse (batched CG)": "refit_cg_s",
    }
    for i, (label, key) in enumerate(bars.items()):
        left.bar([a + (i - 1.5) * 0.2 for a in at], [r[key] for r in rows], 0.2, label=label)
    left.set_yscale("log")
    left.set_xticks(list(at), names)
    left.set_ylabel("seconds per layer")
    left.set_title("SparseGPT 2:4 per ViT-B/16 layer shape", fontsize=9)
    left.legend(fontsize=7)
    whole = payload["prune_s"]
    labels = list(whole)
    right.barh(labels, [whole[m] for m in labels], color="tab:blue")
    right.axvline(LIMIT_S, color="tab:red", ls="--", label="2 min")
    right.set_xlabel("seconds (knsparse.prune, whole model)")
    right.set_title(f"ViT-B/16-shaped model, {payload['config']['threads']} CPU threads", fontsize=9)
    right.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(RESULTS / "sparsegpt_speed.png", dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=16)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pattern = Pattern.parse("2:4")
    per_shape = sweeps(pattern, args.repeats)
    seconds = whole_model(args.images)
    own = {m: seconds[m] - seconds["magnitude"] for m in ("sparsegpt", "sparsegpt-refit")}
    payload = {
        "benchmark": "SparseGPT 2:4 on a ViT-B/16-shaped model, CPU: knsparse.prune, sweep and re-fit vs "
        "their references",
        "config": {"threads": args.threads, "images": args.images, "repeats": args.repeats, "blocksize": 128},
        "prune_s": seconds,
        "own_s": own,
        "within_2_minutes": {m: seconds[m] < LIMIT_S for m in ("sparsegpt", "sparsegpt-refit")},
        "sweeps": per_shape,
        "of_12_blocks_s": {
            key: BLOCKS * sum(s[key] for s in per_shape)
            for key in ("blocked_s", "reference_s", "refit_cg_s", "refit_exact_s")
        },
    }
    path = write_result("sparsegpt_speed", payload)
    plot(payload)
    print(f"wrote {path}: prune {seconds}, beyond magnitude's shared part {own}")


if __name__ == "__main__":
    main()
