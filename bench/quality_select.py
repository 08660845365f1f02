"""Choose the shrinkage ``α`` of CAST and of SER/Hybrid on validation data, never on the test split.

Protocol: 20% of the *training* images (stratified, seed 0) are held out as a validation set;
selection copies of the built-in models are trained on the other 80% with the same recipes
(``pretrained(name, validation=0.2)``). Every candidate ``α`` prunes those copies one-shot with
calibration batches drawn from the 80% (three draws) and is scored by validation accuracy.
A knob's score is the mean over its rows (CAST: 2:4 and 8:16 on both models, ``cast`` on the
ViT and ``cast-conv`` on the ResNet; Hybrid: 60% and 70% on both models); the best score wins,
ties go to the larger ``α`` (closer to the data-free magnitude). Magnitude rows are measured
alongside for reference only. ``bench/quality.py`` reads the chosen values from the JSON this
writes (``bench/results/quality_select.json``). Run: ``python bench/quality_select.py``.
"""

from __future__ import annotations

import argparse
import statistics
import time

from _meta import write_result
from tqdm.auto import tqdm

from knsparse.app import calibration_batches, evaluate, load_digits_split, pretrained, validation_split
from knsparse.pruning.prune import prune

VALIDATION = 0.2
ALPHAS = (0.0, 0.25, 0.5, 0.75, 1.0)
EXPLORED_RESERVOIRS = (0.2, 1.0)
"""Deeper reservoirs with the unshrunk score, tried while diagnosing Hybrid (not selected on)."""
MODELS = {"vit_tiny_digits": "cast", "resnet_tiny_digits": "cast-conv"}


def candidates() -> list[tuple[str, str, str, dict]]:
    """``(knob, model, method, prune kwargs)``; knob ``""`` marks a reference row (not selected on)."""
    rows = []
    for model, cast in MODELS.items():
        for pattern in ("2:4", "8:16"):
            rows.append(("", model, "magnitude", {"pattern": pattern}))
            rows += [("cast", model, cast, {"pattern": pattern, "shrinkage": a}) for a in ALPHAS]
        for s in (0.6, 0.7):
            rows += [("", model, "magnitude", {"sparsity": s, "mode": m}) for m in ("layer", "global")]
            rows += [
                ("hybrid", model, "hybrid", {"sparsity": s, "switch": 0.5, "shrinkage": a}) for a in ALPHAS
            ]
            rows += [
                ("", model, "hybrid", {"sparsity": s, "switch": 0.5, "shrinkage": 0.0, "reservoir": r})
                for r in EXPLORED_RESERVOIRS
            ]
    return rows


def choose(rows: list[dict]) -> dict[str, dict]:
    """Per knob: mean validation accuracy of every ``α`` over the knob's rows, and the winner."""
    out = {}
    for knob in ("cast", "hybrid"):
        scores = {
            a: statistics.mean(r["val"] for r in rows if r["knob"] == knob and r["args"]["shrinkage"] == a)
            for a in ALPHAS
        }
        best = max(ALPHAS, key=lambda a: (round(scores[a], 10), a))
        out[knob] = {"scores": {str(a): s for a, s in scores.items()}, "shrinkage": best}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    data = validation_split(load_digits_split(0), VALIDATION, seed=0)
    models = {n: pretrained(n, seed=0, progress=True, validation=VALIDATION) for n in MODELS}
    dense = {n: evaluate(m, data.x_test, data.y_test) for n, m in models.items()}
    start = time.perf_counter()
    rows = []
    for knob, model, method, kwargs in tqdm(candidates(), desc="candidates"):
        seeds = [-1] if method == "magnitude" else args.calib_seeds
        accs = []
        for seed in seeds:
            calib = calibration_batches(data, 64, 4, seed=seed) if seed >= 0 else None
            result = prune(models[model], method, calib=calib, progress=False, **kwargs)
            accs.append(evaluate(result.model, data.x_test, data.y_test))
        rows.append(
            {"knob": knob, "model": model, "method": method, "args": kwargs, "val": statistics.mean(accs)}
        )
        tqdm.write(f"{model:20s} {method:10s} {kwargs} val {rows[-1]['val']:.4f}")
    chosen = choose(rows)
    payload = {
        "benchmark": "validation choice of CAST and Hybrid shrinkage (one-shot, held-out training images)",
        "config": {
            "validation_fraction": VALIDATION,
            "validation_images": len(data.y_test),
            "fit_images": len(data.y_train),
            "calib_seeds": args.calib_seeds,
            "alphas": ALPHAS,
        },
        "dense_val": dense,
        "rows": rows,
        "chosen": chosen,
        "seconds": time.perf_counter() - start,
    }
    path = write_result("quality_select", payload)
    print({k: v["shrinkage"] for k, v in chosen.items()}, f"wrote {path}")


if __name__ == "__main__":
    main()
