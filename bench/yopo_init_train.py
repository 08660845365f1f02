"""Train from scratch with masks chosen at initialisation: YOPO vs random, same per-layer sparsity.

For each built-in digits model (``vit_tiny_digits``, ``resnet_tiny_digits``), seed and target
sparsity, one freshly initialised model is pruned two ways and each copy is trained with its mask
held fixed (``knsparse.models.train(masks=...)``):

* ``yopo``: ``knsparse.score.yopo`` scores of the initial weights, thresholded to the target by
  ``knsparse.budget.mort(mode="global")`` (which sets each layer's sparsity; every output row keeps
  at least one weight);
* ``random``: uniformly random weights kept in every layer, exactly as many as the YOPO mask of
  that layer keeps, with the same one-weight-per-row guarantee.

The first layer (patch embedding / stem conv) and the classifier stay dense in both arms, as is
usual in pruning. Test accuracy is averaged over the seeds; the epochs are cut from the
checkpoint recipes (ViT 15 of 30, ResNet 5 of 15) and the runs go to two worker processes, so
the whole check takes minutes on two CPU cores.

    python bench/yopo_init_train.py                       # 3 seeds, 90% and 98%
    python bench/yopo_init_train.py --seeds 0 --vit-epochs 4 --resnet-epochs 2   # smoke run

Writes bench/results/yopo_init_train.json, .md (the table the README links to) and .png.
"""

from __future__ import annotations

import argparse
import multiprocessing
import statistics
import time
from pathlib import Path

import torch
from _meta import RESULTS, write_result
from tqdm.auto import tqdm

from knsparse.budget import mort
from knsparse.models import evaluate, load_digits_split, train
from knsparse.models.trainer import RECIPES
from knsparse.score import prunable_weights, yopo

DENSE_LAYERS = {"vit_tiny_digits": ("patch_embed.proj", "head"), "resnet_tiny_digits": ("conv1", "fc")}


def random_masks_like(masks: dict[str, torch.Tensor], seed: int) -> dict[str, torch.Tensor]:
    """Per layer, a uniformly random mask with the same number of kept weights and at least one
    kept weight in every output row (one random pick per row first, the rest anywhere)."""
    g = torch.Generator().manual_seed(10_000 + seed)
    out = {}
    for name, mask in masks.items():
        rows = mask.reshape(mask.shape[0], -1)
        keys = torch.rand(rows.shape, generator=g)
        first = torch.randint(rows.shape[1], (rows.shape[0],), generator=g)
        keys[torch.arange(rows.shape[0]), first] += 1.0  # ranked above every plain key
        keep = torch.zeros(rows.numel(), dtype=torch.bool)
        keep[keys.flatten().argsort(descending=True)[: int(rows.sum())]] = True
        out[name] = keep.reshape(mask.shape)
    return out


def sparsity(masks: dict[str, torch.Tensor]) -> float:
    return 1.0 - sum(int(m.sum()) for m in masks.values()) / sum(m.numel() for m in masks.values())


def kept_below_median(masks: dict[str, torch.Tensor], weights: dict[str, torch.Tensor]) -> float:
    """Share of the kept weights whose initial ``|w|`` is below their layer's median ``|w|``."""
    below = sum(int(((weights[k].abs() < weights[k].abs().median()) & m).sum()) for k, m in masks.items())
    return below / sum(int(m.sum()) for m in masks.values())


def masks_for_seed(name: str, seed: int, targets: list[float], iters: int) -> list[dict]:
    """The training jobs of one freshly initialised model: both arms at every target sparsity."""
    build, _ = RECIPES[name]
    torch.manual_seed(seed)
    init = build()
    weights = prunable_weights(init)
    layers = [n for n in weights if n not in DENSE_LAYERS[name]]
    scores = yopo(init, iters=iters, seed=seed, layers=layers)
    jobs = []
    for target in targets:
        yopo_masks = mort(scores, target, mode="global")
        for arm, masks in (("yopo", yopo_masks), ("random", random_masks_like(yopo_masks, seed))):
            jobs.append(
                {
                    "model": name,
                    "seed": seed,
                    "target_sparsity": target,
                    "arm": arm,
                    "kept_below_median_init_abs_w": kept_below_median(masks, weights),
                    "init": init.state_dict(),
                    "masks": masks,
                }
            )
    return jobs


def train_job(job: dict, epochs: int) -> dict:
    """Train one masked copy of the initial model; runs in a worker process with one thread."""
    torch.set_num_threads(1)
    build, recipe = RECIPES[job["model"]]
    model = build()
    model.load_state_dict(job["init"])
    data = load_digits_split(job["seed"])
    start = time.perf_counter()
    train(
        model,
        data,
        epochs,
        recipe.lr,
        recipe.weight_decay,
        recipe.batch_size,
        masks=job["masks"],
        seed=job["seed"],
        progress=False,
    )
    return {
        **{k: job[k] for k in ("model", "seed", "target_sparsity", "arm", "kept_below_median_init_abs_w")},
        "realised_sparsity": sparsity(job["masks"]),
        "layer_sparsity": {k: 1.0 - float(m.float().mean()) for k, m in job["masks"].items()},
        "test_accuracy": evaluate(model, data.x_test, data.y_test),
        "train_seconds": time.perf_counter() - start,
    }


def summarise(runs: list[dict]) -> list[dict]:
    table = []
    for name in dict.fromkeys(r["model"] for r in runs):
        for target in dict.fromkeys(r["target_sparsity"] for r in runs):
            cell = {"model": name, "target_sparsity": target}
            accs = {}
            for arm in ("yopo", "random"):
                mine = [
                    r for r in runs if (r["model"], r["target_sparsity"], r["arm"]) == (name, target, arm)
                ]
                accs[arm] = [r["test_accuracy"] for r in sorted(mine, key=lambda r: r["seed"])]
                cell[arm] = {
                    "mean_accuracy": statistics.mean(accs[arm]),
                    "std_accuracy": statistics.stdev(accs[arm]) if len(accs[arm]) > 1 else 0.0,
                    "accuracies": accs[arm],
                    "mean_realised_sparsity": statistics.mean(r["realised_sparsity"] for r in mine),
                    "mean_kept_below_median_init_abs_w": statistics.mean(
                        r["kept_below_median_init_abs_w"] for r in mine
                    ),
                }
            cell["delta_pp"] = 100 * (cell["yopo"]["mean_accuracy"] - cell["random"]["mean_accuracy"])
            cell["yopo_wins"] = sum(y > r for y, r in zip(accs["yopo"], accs["random"], strict=True))
            cell["seeds"] = len(accs["yopo"])
            table.append(cell)
    return table


def markdown(table: list[dict], config: dict) -> str:
    lines = [
        "# YOPO masks at initialisation vs random masks (train from scratch, bundled digits)",
        "",
        f"Test accuracy, mean ± std over seeds {config['seeds']}; both arms have the same per-layer sparsity "
        f"(YOPO rank 7, {config['iters']} NMF iterations, MORT global thresholds; first layer and classifier "
        f"dense). Epochs: ViT {config['epochs']['vit_tiny_digits']}, ResNet "
        f"{config['epochs']['resnet_tiny_digits']}. Last column: share of the weights YOPO keeps whose "
        "initial |w| is below their layer's median (random masks keep about half). Produced by "
        "`bench/yopo_init_train.py`; raw numbers in `yopo_init_train.json`.",
        "",
        "| model | sparsity | YOPO | random | Δ (pp) | YOPO better | YOPO keeps below-median init \\|w\\| |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in table:
        y, r = c["yopo"], c["random"]
        lines.append(
            f"| {c['model']} | {100 * y['mean_realised_sparsity']:.1f}% | "
            f"{100 * y['mean_accuracy']:.1f} ± {100 * y['std_accuracy']:.1f} | "
            f"{100 * r['mean_accuracy']:.1f} ± {100 * r['std_accuracy']:.1f} | {c['delta_pp']:+.1f} | "
            f"{c['yopo_wins']}/{c['seeds']} seeds | {100 * y['mean_kept_below_median_init_abs_w']:.1f}% |"
        )
    return "\n".join(lines) + "\n"


def plot(table: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.5))
    labels = [f"{c['model'].split('_')[0]}\n{100 * c['target_sparsity']:.0f}%" for c in table]
    xs = range(len(table))
    for offset, arm, color in ((-0.2, "yopo", "tab:green"), (0.2, "random", "tab:gray")):
        ax.bar(
            [x + offset for x in xs],
            [100 * c[arm]["mean_accuracy"] for c in table],
            width=0.4,
            yerr=[100 * c[arm]["std_accuracy"] for c in table],
            color=color,
            label=arm,
        )
    ax.set_xticks(list(xs), labels)
    ax.set_ylabel("test accuracy [%]")
    ax.set_title("Masks at initialisation, trained from scratch (digits)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--sparsities", type=float, nargs="+", default=[0.9, 0.98])
    parser.add_argument("--vit-epochs", type=int, default=15)
    parser.add_argument("--resnet-epochs", type=int, default=5)
    parser.add_argument("--iters", type=int, default=200, help="YOPO NMF iterations")
    parser.add_argument("--workers", type=int, default=2, help="training processes, one thread each")
    parser.add_argument("--name", default="yopo_init_train")
    args = parser.parse_args()
    epochs = {"vit_tiny_digits": args.vit_epochs, "resnet_tiny_digits": args.resnet_epochs}
    jobs = [
        job
        for name in epochs
        for seed in args.seeds
        for job in masks_for_seed(name, seed, args.sparsities, args.iters)
    ]
    with multiprocessing.get_context("spawn").Pool(args.workers) as pool:
        pending = [pool.apply_async(train_job, (job, epochs[job["model"]])) for job in jobs]
        runs = [p.get() for p in tqdm(pending, desc="train", unit="run")]
    table = summarise(runs)
    config = {"seeds": args.seeds, "epochs": epochs, "iters": args.iters, "sparsities": args.sparsities}
    path = write_result(args.name, {"config": config, "summary": table, "runs": runs})
    (RESULTS / f"{args.name}.md").write_text(markdown(table, config))
    plot(table, RESULTS / f"{args.name}.png")
    print(markdown(table, config))
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
