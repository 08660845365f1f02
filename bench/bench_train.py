"""Training time and test accuracy of the built-in models on the bundled digits.

Training runs on one thread (``knsparse.app.train``), so the figures do not depend on the
core count, but they do on what else the machine runs: the host load is recorded.

Run on an otherwise idle machine:  .venv/bin/python bench/bench_train.py [--seeds 0 1 2]
Writes bench/results/train.json.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
from _meta import write_result

from knsparse.app import evaluate, load_digits_split, train
from knsparse.app.trainer import RECIPES


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    args = parser.parse_args()
    rows = []
    for name, (build, recipe) in RECIPES.items():
        for seed in args.seeds:
            data = load_digits_split(seed)
            torch.manual_seed(seed)
            model = build()
            start = time.perf_counter()
            train(
                model,
                data,
                recipe.epochs,
                recipe.lr,
                recipe.weight_decay,
                recipe.batch_size,
                seed=seed,
                progress=False,
            )
            seconds = time.perf_counter() - start
            acc = evaluate(model, data.x_test, data.y_test)
            rows.append({"model": name, "seed": seed, "train_seconds": seconds, "test_accuracy": acc})
            print(f"{name:<20} seed {seed}: {acc:.2%} in {seconds:.1f} s")
    summary = {}
    for name in RECIPES:
        mine = [r for r in rows if r["model"] == name]
        summary[name] = {
            "median_train_seconds": statistics.median(r["train_seconds"] for r in mine),
            "max_train_seconds": max(r["train_seconds"] for r in mine),
            "min_test_accuracy": min(r["test_accuracy"] for r in mine),
            "mean_test_accuracy": statistics.mean(r["test_accuracy"] for r in mine),
        }
    print(write_result("train", {"runs": rows, "summary": summary}))


if __name__ == "__main__":
    main()
