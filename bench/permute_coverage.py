"""Channel-permutation coverage on production architectures (random init, no weights download).

For each model: the fraction of its 2:4-prunable layers (``knsparse.core.layers.pattern_layers``)
that read a permuted channel group, and the search's efficacy (apex ASP's definition, see
:mod:`knsparse.pruning.permutation.objective`) — mean over the permuted groups and over all kept
magnitude. The search runs with ``permute()``'s defaults (the whole model's groups searched
together, tabu steps and swap rounds split by group size); ``--budget`` optionally caps it at
that many wall-clock seconds per group, pooled over the model. Every permutation is checked
to leave the model's output unchanged (``permute(..., calib=...)``).

Models that need an optional package (timm, torchvision, transformers) are skipped with the
reason when it is missing. torchvision's ``vit_b_16`` keeps q/k/v in ``nn.MultiheadAttention``,
which no permutation rule reads yet.

    python bench/permute_coverage.py   # writes bench/results/permute_coverage.json and .png
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt
import torch
from _meta import RESULTS, write_result
from torch import nn
from tqdm.auto import tqdm

from knsparse.core.layers import pattern_layers
from knsparse.core.pattern import Pattern
from knsparse.pruning.permutation import permute


class _Logits(nn.Module):
    """Hugging Face models return an output object: permute() compares its ``logits``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.model(x)
        return getattr(out, "logits", out)


def _timm(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import timm

        return timm.create_model(name)

    return build


def _torchvision(name: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import torchvision

        return getattr(torchvision.models, name)()

    return build


def _hf(kind: str) -> Callable[[], nn.Module]:
    def build() -> nn.Module:
        import transformers

        config = getattr(transformers, f"{kind}Config")()  # the library's default (base) sizes
        return _Logits(getattr(transformers, f"{kind}ForImageClassification")(config))

    return build


MODELS: dict[str, Callable[[], nn.Module]] = {
    "timm:resnet50": _timm("resnet50"),
    "torchvision:resnet50": _torchvision("resnet50"),
    "timm:vit_base_patch16_224": _timm("vit_base_patch16_224"),
    "torchvision:vit_b_16": _torchvision("vit_b_16"),
    "hf:ViT (ViTConfig())": _hf("ViT"),
    "hf:ConvNext (ConvNextConfig())": _hf("ConvNext"),
}
GOALS = {"timm:resnet50": 0.9, "torchvision:resnet50": 0.9, "timm:vit_base_patch16_224": 0.75}


def measure(name: str, build: Callable[[], nn.Module], budget: float | None) -> dict:
    torch.manual_seed(0)
    model = build().eval()
    layers, _ = pattern_layers(model, Pattern.parse("2:4"))
    x = torch.randn(1, 3, 224, 224)
    start = time.perf_counter()
    report = permute(model, "2:4", calib=[x], time_budget_s=budget)
    seconds = time.perf_counter() - start
    reached = {c for g in report.permuted for c in g.consumers} & set(layers)
    before = sum(g.kept_before for g in report.permuted)
    return {
        "prunable_layers": len(layers),
        "permuted_layers": len(reached),
        "fraction": len(reached) / len(layers),
        "goal": GOALS.get(name),
        "groups": len(report.groups),
        "permuted_groups": len(report.permuted),
        "mean_group_efficacy": sum(g.efficacy for g in report.permuted) / max(len(report.permuted), 1),
        "kept_gain": (sum(g.kept_after for g in report.permuted) - before) / before if before else 0.0,
        "layers_keeping_less": sum(len(g.losers) for g in report.permuted),
        "whole_model_trace_error": report.trace_error,
        "not_reached": sorted(set(layers) - reached),
        "skipped_groups": {g.name: g.skip_reason for g in report.groups if not g.permuted},
        "seconds": seconds,
    }


def plot(results: dict, path: str) -> None:
    names = [n for n, r in results.items() if "fraction" in r]
    fig, ax = plt.subplots(figsize=(8, 3.5))
    ax.barh(names, [results[n]["fraction"] for n in names], color="tab:blue", label="layers reached")
    ax.barh(
        names,
        [results[n]["mean_group_efficacy"] for n in names],
        height=0.3,
        color="tab:orange",
        label="mean group efficacy",
    )
    for i, n in enumerate(names):
        if results[n]["goal"]:
            ax.plot([results[n]["goal"]] * 2, [i - 0.4, i + 0.4], "k--")
    ax.set_xlim(0, 1)
    ax.set_xlabel("fraction of 2:4-prunable layers permuted (dashed: goal)")
    ax.invert_yaxis()
    ax.legend(loc="lower right", fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--budget", type=float, default=None, help="search seconds per group, pooled (default: no cap)"
    )
    parser.add_argument("--models", nargs="*", default=list(MODELS), help="a subset of the models")
    args = parser.parse_args()
    results = {}
    for name in tqdm(args.models, desc="models"):
        try:
            results[name] = measure(name, MODELS[name], args.budget)
        except ImportError as err:
            results[name] = {"skipped": f"{type(err).__name__}: {err}"}
        tqdm.write(f"{name}: {results[name].get('fraction', results[name].get('skipped'))}")
    write_result(
        "permute_coverage",
        {
            "pattern": "2:4",
            "init": "random (seed 0)",
            "search": {"options": "permute() defaults", "time_budget_s_per_group_pooled": args.budget},
            "models": results,
        },
    )
    plot(results, str(RESULTS / "permute_coverage.png"))


if __name__ == "__main__":
    main()
