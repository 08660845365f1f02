"""Learned 2:4 masks vs fixed masks in the same distillation, equal steps, paired over models.

Stated before the first run:

* models: the built-in ViT and ResNet trained with seeds 0-3 on the training images of the seed-0
  digits split that are left after a 20% validation hold-out (``pretrained(validation=0.2)``);
* pruning: one-shot 2:4 (the default ``sparsegpt-refit``, 4x64 calibration
  images from the training part) on every 2:4-eligible layer but the first and the last;
* fine-tuning: ``ks.finetune`` on the training part, 2 epochs, batch 64, lr 2e-3, the same steps
  and seed for both arms; fixed masks vs ``learn_masks=MaskLearning(lr, prior)``;
* selection: ``MaskLearning``'s ``lr`` in {0.1, 0.3} and ``prior`` in {1, 3} chosen on the
  validation images (top-1 accuracy, training seed 0, each pruning method), never on the test
  split; then every trained model is run with the chosen options and evaluated on the test split;
* per trained model the paired difference ``d = learned − fixed`` in test images; mean, 95%
  Student-t interval, wins/ties/losses (``quality_paired.paired``).

Writes ``bench/results/learned_masks.{json,md,png}``. Run: ``python bench/learned_masks.py``.
"""

from __future__ import annotations

import argparse
import itertools
import statistics
import time

import torch
from _meta import RESULTS, environment, write_result
from quality_paired import describe, paired, plot_paired
from tqdm.auto import tqdm

import knsparse as ks
from knsparse.app import calibration_batches, evaluate, load_digits_split, pretrained
from knsparse.app.data import validation_split

# the first layers (1 input channel) are not 2:4-eligible anyway
EDGES = {"vit_tiny_digits": ["head"], "resnet_tiny_digits": ["fc"]}
METHODS = ("sparsegpt-refit",)
GRID = {"lr": (0.1, 0.3), "prior": (1.0, 3.0)}


def run(
    name: str, dense, fit, method: str, learn: ks.MaskLearning | None, args
) -> tuple[torch.nn.Module, float]:
    """The pruned + fine-tuned student and the share of mask entries learning moved."""
    calib = calibration_batches(fit, batch_size=64, n_batches=4, seed=0)
    result = ks.prune(dense, method, "2:4", calib=calib, keep_dense=EDGES[name], progress=False)
    tuned = ks.finetune(
        result.model,
        dense,
        (fit.x_train, fit.y_train),
        epochs=args.epochs,
        plan=result.plan,
        batch_size=64,
        lr=args.lr,
        progress=False,
        learn_masks=learn or False,
    )
    moved = sum(int((tuned.masks[n] != result.plan.masks[n]).sum()) for n in result.plan.masks)
    total = sum(m.numel() for m in result.plan.masks.values())
    return tuned.model, moved / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2, 3])
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--models", nargs="+", default=list(EDGES))
    args = parser.parse_args()
    torch.set_num_threads(1)
    data = load_digits_split(0)
    fit = validation_split(data, 0.2, 0)
    start = time.perf_counter()
    selection, comparisons = [], []
    for name, method in itertools.product(args.models, METHODS):
        dense0 = pretrained(
            name, seed=0, progress=False, validation=0.2, train_seed=args.train_seeds[0]
        ).eval()
        scores = {}
        for lr, prior in tqdm(
            list(itertools.product(GRID["lr"], GRID["prior"])), desc=f"select {name} {method}"
        ):
            model, moved = run(name, dense0, fit, method, ks.MaskLearning(lr=lr, prior=prior), args)
            scores[(lr, prior)] = evaluate(model, fit.x_test, fit.y_test)
            selection.append(
                {
                    "model": name,
                    "method": method,
                    "lr": lr,
                    "prior": prior,
                    "val": scores[(lr, prior)],
                    "moved": moved,
                }
            )
        lr, prior = max(scores, key=lambda k: (scores[k], -k[0]))
        chosen = ks.MaskLearning(lr=lr, prior=prior)
        fixed, learned, moved = [], [], []
        for seed in tqdm(args.train_seeds, desc=f"test {name} {method}"):
            dense = pretrained(name, seed=0, progress=False, validation=0.2, train_seed=seed).eval()
            fixed.append(evaluate(run(name, dense, fit, method, None, args)[0], data.x_test, data.y_test))
            model, share = run(name, dense, fit, method, chosen, args)
            learned.append(evaluate(model, data.x_test, data.y_test))
            moved.append(share)
        row = {
            "model": name,
            "method": method,
            "chosen": {"lr": lr, "prior": prior},
            "fixed": fixed,
            "learned": learned,
            "moved": moved,
            "paired": paired(learned, fixed, len(data.y_test), "learned masks"),
        }
        comparisons.append(row)
        tqdm.write(f"{name} {method} lr={lr} prior={prior}: {describe(row['paired'])}")
    config = {
        "train_seeds": args.train_seeds,
        "epochs": args.epochs,
        "lr": args.lr,
        "batch_size": 64,
        "grid": GRID,
        "dense_layers": EDGES,
        "test_images": len(data.y_test),
        "validation_images": len(fit.y_test),
    }
    payload = {
        "benchmark": "learned vs fixed 2:4 masks in the same distillation, paired over trained models",
        "config": config,
        "selection": selection,
        "comparisons": comparisons,
        "seconds": time.perf_counter() - start,
    }
    path = write_result("learned_masks", payload)
    (RESULTS / "learned_masks.md").write_text(markdown(comparisons, config, environment()))
    labels = [f"{r['model'].split('_')[0]} {r['method']}" for r in comparisons]
    plot_paired(comparisons, labels, "learned − fixed masks", RESULTS / "learned_masks.png")
    print(f"wrote {path}")


def markdown(comparisons: list[dict], config: dict, env: dict) -> str:
    out = [
        "# Learned vs fixed 2:4 masks, equal distillation steps, paired over trained models",
        "",
        f"Generated by `python bench/learned_masks.py` on {env['device']} (commit `{env['commit']}`, "
        f"torch {env['versions']['torch']}). {len(config['train_seeds'])} trained models per architecture "
        f"(seeds {config['train_seeds']}), {config['epochs']} epochs of distillation at lr {config['lr']}, "
        f"batch {config['batch_size']}; `MaskLearning` options chosen on {config['validation_images']} "
        f"validation images (grid {config['grid']}); test split {config['test_images']} images. "
        "`d` = learned − fixed in test images per trained model, 95% Student-t interval. "
        "Protocol: the script's docstring.",
        "",
        "| model | one-shot method | chosen (lr, prior) | fixed | learned | entries moved | mean d | 95% CI "
        "| wins/ties/losses | verdict |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- | --- | --- |",
    ]
    for r in comparisons:
        p = r["paired"]
        out.append(
            f"| {r['model']} | {r['method']} | {r['chosen']['lr']}, {r['chosen']['prior']} | "
            f"{statistics.mean(r['fixed']):.4f} | {statistics.mean(r['learned']):.4f} | "
            f"{statistics.mean(r['moved']):.2%} | {p['mean_images']:+.2f} | "
            f"[{p['ci95_images'][0]:+.2f}, {p['ci95_images'][1]:+.2f}] | "
            f"{p['wins']}/{p['ties']}/{p['losses']} | {p['verdict']} |"
        )
    return "\n".join([*out, ""])


if __name__ == "__main__":
    main()
