"""SparseGPT 2:4 speed on a ViT-B/16-shaped model (86 M parameters, random weights) on the CPU.

Two measurements in one run:

* end to end: ``knsparse.prune(model, "sparsegpt", "2:4", calib=...)`` with 16 images at
  224 px (3152 GEMM rows, enough for the 3072x3072 fc2 Gram), everything included (MP fits,
  calibration passes, sweeps, certificate pass);
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

from knsparse.methods.obs import damped, inverse_cholesky, sparsegpt_sweep, sparsegpt_sweep_ref
from knsparse.models import vit_base_patch16_224
from knsparse.pattern import Pattern
from knsparse.prune import prune

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
    start = time.perf_counter()
    result = prune(model, "sparsegpt", "2:4", calib=calib, progress=True)
    end_to_end = time.perf_counter() - start
    layers = len(result.masks)
    print(f"prune ViT-B/16 sparsegpt 2:4: {end_to_end:.1f} s, {layers} layers")
    per_model = sum(12 * s["blocked_s"] for s in sweeps)
    payload = {
        "benchmark": "SparseGPT 2:4 on a ViT-B/16-shaped model, CPU",
        "config": {"threads": args.threads, "images": args.images, "repeats": args.repeats, "blocksize": 128},
        "end_to_end_prune_s": end_to_end,
        "pruned_layers": layers,
        "within_2_minutes": end_to_end < 120,
        "sweeps": sweeps,
        "sweeps_of_12_blocks_s": {
            "blocked": per_model,
            "reference": sum(12 * s["reference_s"] for s in sweeps),
        },
        "note": "machine shared with other agents; see the load average in environment",
    }
    path = write_result("sparsegpt_speed", payload)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
