"""SparseGPT 2:4 speed on a ViT-B/16-shaped model (86 M parameters, random weights) on the CPU.

Two measurements in one run:

* the whole model: full calibration Grams of every prunable layer (16 images at 224 px, 3152
  GEMM rows; 12 layers per calibration pass, early stop) and the ``sparsegpt`` method on each
  layer (damping, inverse Cholesky, sweep, output error). ``knsparse.prune`` adds its MP fits and
  the certificate pass on top, which are not SparseGPT and are not timed here;
* the sweep alone, per ViT-B/16 layer shape (qkv, proj, fc1, fc2): the blocked sweep
  (:func:`knsparse.methods.obs.sparsegpt_sweep`, lazy block updates) against the straightforward
  reference (:func:`knsparse.methods.obs.sparsegpt_sweep_ref`, every OBS update applied to all
  remaining columns), medians of ``--repeats`` runs, with the largest difference of their
  results.

Writes ``bench/results/sparsegpt_speed.json``. Run: ``python bench/sparsegpt_speed.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _meta import write_result
from tqdm.auto import tqdm

from knsparse.calibration import collect_input_stats
from knsparse.layers import pattern_layers, reduction_weight
from knsparse.methods import Layer, sparsegpt
from knsparse.methods.obs import damped, inverse_cholesky, sparsegpt_sweep, sparsegpt_sweep_ref
from knsparse.models import vit_base_patch16_224
from knsparse.pattern import Pattern

SHAPES = {"qkv": (2304, 768), "proj": (768, 768), "fc1": (3072, 768), "fc2": (768, 3072)}


def timed(fn, repeats: int) -> tuple[float, object]:
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--images", type=int, default=16)
    parser.add_argument(
        "--reference-shapes", nargs="*", default=list(SHAPES), help="shapes timed with the reference"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    pattern = Pattern.parse("2:4")

    sweeps = []
    for name, (out, k) in SHAPES.items():
        w = torch.randn(out, k) * 0.02
        x = torch.randn(4 * k, k) @ (torch.eye(k) + 0.3 * torch.randn(k, k) / k**0.5)
        u = inverse_cholesky(damped((x.T @ x).double(), 0.01, name), name)
        blocked, (mask_b, new_b) = timed(lambda w=w, u=u: sparsegpt_sweep(w, u, pattern), args.repeats)
        if name not in args.reference_shapes:
            sweeps.append({"layer": name, "shape": [out, k], "blocked_s": blocked, "reference_s": None})
            continue
        ref, (mask_r, new_r) = timed(lambda w=w, u=u: sparsegpt_sweep_ref(w, u, pattern), 1)
        sweeps.append(
            {
                "layer": name,
                "shape": [out, k],
                "blocked_s": blocked,
                "reference_s": ref,
                "speedup": ref / blocked,
                "same_mask": bool(torch.equal(mask_b, mask_r)),
                "max_abs_diff": float((new_b - new_r).abs().max()),
            }
        )
        print(sweeps[-1])

    model = vit_base_patch16_224().eval()
    calib = list(torch.randn(args.images, 3, 224, 224).split(8))
    layers, _ = pattern_layers(model, pattern)
    start = time.perf_counter()
    views = {}
    for names in tqdm([list(layers)[i : i + 12] for i in range(0, len(layers), 12)], desc="calibration"):
        stats = collect_input_stats(
            model, {n: layers[n] for n in names}, calib, full_gram=True, stop_early=True
        )
        views.update(
            {n: Layer(n, reduction_weight(layers[n]).float(), False, None, stats[n]) for n in names}  # type: ignore[arg-type]
        )
    calibrated = time.perf_counter() - start
    decisions = {}
    for name, view in tqdm(views.items(), desc="sparsegpt"):
        decisions.update(sparsegpt({name: view}, pattern))
    end_to_end = time.perf_counter() - start
    layers_n = len(decisions)
    print(f"ViT-B/16 sparsegpt 2:4: {end_to_end:.1f} s ({calibrated:.1f} s calibration), {layers_n} layers")
    per_model = sum(12 * s["blocked_s"] for s in sweeps)
    payload = {
        "benchmark": "SparseGPT 2:4 on a ViT-B/16-shaped model, CPU",
        "config": {"threads": args.threads, "images": args.images, "repeats": args.repeats, "blocksize": 128},
        "sparsegpt_whole_model_s": end_to_end,
        "calibration_s": calibrated,
        "pruned_layers": layers_n,
        "within_2_minutes": end_to_end < 120,
        "sweeps": sweeps,
        "sweeps_of_12_blocks_s": {"blocked": per_model},
        "note": "machine shared with other agents; see the load average in environment",
    }
    path = write_result("sparsegpt_speed", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
