"""What each layer's mask costs the model's output, and keeping layers dense to a target.

:func:`layer_sensitivity` prunes one layer at a time — its pruned weight, every other layer
dense — and measures on the calibration batches how far the final logits move from the dense
model's: the mean ``KL(p_dense ‖ p_pruned)`` over images (``p = softmax(logits)``, nats) and the
top-1 agreement (fraction of images whose arg-max class is the dense model's). Each row also
carries the layer's dense multiply-accumulates per image at the calibration input size (counted
by :func:`knsparse.core.layers.weight_macs`, the formula :func:`knsparse.macs` uses).

:func:`keep_dense_to_target` is what ``keep_dense="auto"`` in :func:`knsparse.prune` runs:
starting from every layer pruned, it gives layers back their dense weights one at a time,
**greedily by KL per MAC** (the harm a layer causes alone divided by its MACs: the most harm
removed per sparse MAC given up), measuring the whole model on held-out batches after each,
until the :class:`~knsparse.pruning.config.DenseTarget` is met.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.checks import check_module
from ..core.layers import layer_kind, placement_reasons, swap_ineligibility, weight_macs
from ..core.pattern import Pattern
from ..core.plan import SparsityPlan, as_plan
from ..utils.batches import Batch, model_batches, model_device, output_tensors
from ..utils.modes import evaluation
from .calibration import check_calibration
from .config import DenseTarget


@dataclass(frozen=True)
class SensitivityRow:
    """One layer pruned alone. ``kl``: mean ``KL(dense ‖ pruned)`` of the final logits, nats per
    image; ``agreement``: top-1 agreement with the dense model in [0, 1]; ``macs``: the layer's
    dense MACs per image; ``sparse_executable``: whether a sparse backend would run it (the swap
    rule of :func:`knsparse.swap_modules`), else ``why`` not."""

    name: str
    kl: float
    agreement: float
    macs: int
    sparse_executable: bool = True
    why: str = ""

    @property
    def kl_per_mmac(self) -> float:
        """``kl`` per million MACs: the greedy order of ``keep_dense="auto"``."""
        return self.kl / max(self.macs / 1e6, 1e-12)

    def as_dict(self) -> dict[str, object]:
        return {**asdict(self), "kl_per_mmac": self.kl_per_mmac}


def _logits(output: object) -> torch.Tensor:
    """The class scores ``[images, classes]`` of a model output (its first tensor, flattened to
    rows of the last dimension)."""
    tensors = output_tensors(output)
    if not tensors or not tensors[0].is_floating_point():
        raise ValueError("layer sensitivity needs a model that returns floating-point logits")
    return tensors[0].detach().float().reshape(-1, tensors[0].shape[-1])


@torch.no_grad()
def model_logits(model: nn.Module, batches: Sequence[Batch]) -> list[torch.Tensor]:
    """``[images, classes]`` logits of every batch (the model in eval mode, modes restored)."""
    with evaluation(model):
        return [_logits(b(model)) for b in batches]


def divergence(reference: Sequence[torch.Tensor], logits: Sequence[torch.Tensor]) -> tuple[float, float]:
    """``(mean KL(p_ref ‖ p), top-1 agreement)`` over all images of paired logit batches."""
    kl, agree, images = 0.0, 0.0, 0
    for ref, out in zip(reference, logits, strict=True):
        log_ref, log_out = ref.log_softmax(-1), out.log_softmax(-1)
        kl += float((log_ref.exp() * (log_ref - log_out)).sum())
        agree += float((ref.argmax(-1) == out.argmax(-1)).sum())
        images += ref.shape[0]
    return max(kl / images, 0.0), agree / images


@torch.no_grad()
def layer_macs(model: nn.Module, batch: Batch) -> tuple[dict[str, int], int]:
    """``({layer: dense MACs per image}, all weight-layer MACs per image)`` of one forward pass of
    ``batch``: every Linear/Conv2d-like layer (:func:`knsparse.core.layers.layer_kind`)."""
    counts: dict[str, int] = {}

    def hook(name: str, kind: str) -> Callable[..., None]:
        def count(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            counts[name] = counts.get(name, 0) + weight_macs(kind, module, args[0], output)

        return count

    handles, counted = [], []
    try:
        for name, module in model.named_modules():
            kind = layer_kind(module)
            if kind is not None and name and not any(name.startswith(f"{c}.") for c in counted):
                counted.append(name)  # its internals (a sparse module's) are not counted again
                handles.append(module.register_forward_hook(hook(name, kind)))
        with evaluation(model):
            batch(model)
    finally:
        for h in handles:
            h.remove()
    per_image = {n: c // batch.size for n, c in counts.items()}
    return per_image, sum(per_image.values())


class _Weights:
    """Switch layers between their dense and pruned weights (the model's own tensors, written in
    place; :meth:`dense_all` puts every dense weight back)."""

    def __init__(self, layers: Mapping[str, nn.Module], dense: Mapping[str, torch.Tensor], pruned) -> None:
        self.layers, self.dense, self.pruned = layers, dense, pruned

    @torch.no_grad()
    def set(self, name: str, pruned: bool) -> None:
        weight = self.layers[name].weight
        weight.copy_((self.pruned if pruned else self.dense)[name].to(weight.dtype))

    def dense_all(self) -> None:
        for name in self.layers:
            self.set(name, False)


def _rows(
    model: nn.Module,
    weights: _Weights,
    masks: Mapping[str, torch.Tensor],
    pattern: Pattern,
    batches: Sequence[Batch],
    reference: Sequence[torch.Tensor],
    progress: bool,
) -> list[SensitivityRow]:
    """Each layer of ``weights`` pruned alone (the model left with every dense weight)."""
    macs, _ = layer_macs(model, batches[0])
    placement = placement_reasons(model)
    rows = []
    weights.dense_all()
    try:
        for name in tqdm(list(weights.layers), desc="sensitivity", unit="layer", disable=not progress):
            weights.set(name, True)
            kl, agreement = divergence(reference, model_logits(model, batches))
            weights.set(name, False)
            why = placement.get(name) or swap_ineligibility(name, weights.layers[name], masks[name], pattern)
            rows.append(SensitivityRow(name, kl, agreement, macs.get(name, 0), not why, why or ""))
    finally:
        weights.dense_all()
    return sorted(rows, key=lambda r: (-r.kl, r.agreement, r.name))


def layer_sensitivity(
    model: nn.Module,
    plan_or_result: SparsityPlan | Mapping[str, torch.Tensor] | object,
    calib: Iterable[object],
    *,
    progress: bool = False,
) -> list[SensitivityRow]:
    """Each planned layer pruned alone, every other layer dense: rows sorted by harm (KL first).

    Args:
        model: the dense model the plan was made for (in the plan's channel order: for a plan
            with a permutation, the permuted model); left unchanged (its weights are switched
            and put back, modes restored).
        plan_or_result: a :class:`~knsparse.pruning.prune.PruneResult` (each layer's pruned
            weight is the result model's: a method's re-fit values included), a
            :class:`~knsparse.core.plan.SparsityPlan` or ``{layer: bool mask}`` (the dense
            weight times the mask).
        calib: the calibration batches (any form :func:`knsparse.prune` takes).

    Returns:
        :class:`SensitivityRow` per layer, most harmful first. ``ValueError`` names a layer the
        model lacks or a mask of the wrong shape, before anything runs.
    """
    check_module(model)
    plan = as_plan(plan_or_result)
    named = dict(model.named_modules())
    for name, mask in plan.masks.items():
        weight = getattr(named.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor):
            raise ValueError(
                f"the plan names layer {name!r}, which the model does not have (or has no weight)"
            )
        if mask.shape != weight.shape:
            raise ValueError(
                f"layer {name!r}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}"
            )
    check_calibration(model, calib)
    layers = {n: named[n] for n in plan.masks}
    result_model = getattr(plan_or_result, "model", None)
    source = dict(result_model.named_modules()) if isinstance(result_model, nn.Module) else None
    dense = {n: m.weight.detach().clone() for n, m in layers.items()}
    device = model_device(model)
    pruned = {}
    for n, w in dense.items():
        mask = plan.masks[n].to(w.device)
        pruned[n] = (source[n].weight.detach().to(w.device, w.dtype) if source else w) * mask
    batches = list(model_batches(calib, device))
    reference = model_logits(model, batches)
    return _rows(
        model, _Weights(layers, dense, pruned), plan.masks, plan.pattern, batches, reference, progress
    )


@dataclass
class DenseTargetReport:
    """What ``keep_dense="auto"`` did. Agreement / KL are on the held-out calibration batches;
    MAC shares are of all weight-layer MACs of the model per image at the calibration size.

    Attributes:
        target: the :class:`~knsparse.pruning.config.DenseTarget`.
        sensitivity: every candidate layer pruned alone, measured on the other batches (most
            harmful first).
        kept_dense: the layers given back their dense weights, in the order they were.
        holdout: indices of the held-out calibration batches.
        agreement_before, kl_before: every candidate layer pruned.
        agreement, kl: after keeping ``kept_dense`` dense (before any repair).
        agreement_repaired, kl_repaired: after the repair, when the config repairs.
        mac_share_before, mac_share: MAC share of the pruned layers, before and after.
        sparse_execution_share_before, sparse_execution_share: MAC share a sparse backend would
            execute (pruned layers the swap rule accepts), before and after.
    """

    target: DenseTarget
    sensitivity: list[SensitivityRow]
    kept_dense: list[str]
    holdout: list[int]
    agreement_before: float
    kl_before: float
    agreement: float
    kl: float
    mac_share_before: float
    mac_share: float
    sparse_execution_share_before: float
    sparse_execution_share: float
    agreement_repaired: float | None = None
    kl_repaired: float | None = None
    trace: list[tuple[str, float, float]] = field(default_factory=list)
    """``(layer kept dense, agreement, KL)`` after each step of the greedy."""

    def as_dict(self) -> dict[str, object]:
        out = {k: v for k, v in asdict(self).items() if k not in ("target", "sensitivity", "trace")}
        out["target"] = self.target.to_dict()
        out["sensitivity"] = [r.as_dict() for r in self.sensitivity]
        out["trace"] = [list(t) for t in self.trace]
        return out

    def summary(self) -> str:
        """A few lines: the target, before/after, the layers kept dense, the shares."""
        lines = [
            f"keep_dense auto ({self.target.describe()}, greedy by KL per MAC, checked on held-out "
            f"calibration batches {self.holdout}): agreement {self.agreement_before:.2%} -> "
            f"{self.agreement:.2%}, KL {self.kl_before:.4f} -> {self.kl:.4f}"
        ]
        if self.agreement_repaired is not None:
            lines.append(
                f"  after the repair: agreement {self.agreement_repaired:.2%}, KL {self.kl_repaired:.4f}"
            )
        lines.append(f"  kept dense ({len(self.kept_dense)}): {', '.join(self.kept_dense) or '-'}")
        lines.append(
            f"  MAC share pruned {self.mac_share_before:.1%} -> {self.mac_share:.1%}; sparse-execution "
            f"share {self.sparse_execution_share_before:.1%} -> {self.sparse_execution_share:.1%}"
        )
        return "\n".join(lines)

    def table(self, top: int | None = None) -> str:
        """The sensitivity rows (most harmful first; ``top`` of them)."""
        head = f"{'layer':<36} {'KL alone':>9} {'agree':>7} {'MMACs':>8} {'KL/MMAC':>9} {'kept dense':>10}"
        lines = [head, "-" * len(head)]
        kept = set(self.kept_dense)
        for r in self.sensitivity[:top]:
            lines.append(
                f"{r.name[:36]:<36} {r.kl:>9.4f} {r.agreement:>7.2%} {r.macs / 1e6:>8.2f} "
                f"{r.kl_per_mmac:>9.4f} {'yes' if r.name in kept else '':>10}"
            )
        return "\n".join(lines)


def _shares(rows: Sequence[SensitivityRow], sparse: Iterable[str], total: int) -> tuple[float, float]:
    by_name = {r.name: r for r in rows}
    chosen = [by_name[n] for n in sparse]
    macs = sum(r.macs for r in chosen)
    executed = sum(r.macs for r in chosen if r.sparse_executable)
    return macs / max(total, 1), executed / max(total, 1)


def keep_dense_to_target(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    dense: Mapping[str, torch.Tensor],
    pruned: Mapping[str, torch.Tensor],
    masks: Mapping[str, torch.Tensor],
    pattern: Pattern,
    fit: Sequence[Batch],
    held: Sequence[Batch],
    reference: tuple[Sequence[torch.Tensor], Sequence[torch.Tensor]],
    target: DenseTarget,
    holdout: list[int],
    progress: bool = False,
) -> DenseTargetReport:
    """Give layers back their dense weights until ``target`` holds on ``held``.

    ``model``'s ``layers`` hold their ``pruned`` weights on entry; on return, the layers of
    ``report.kept_dense`` hold their ``dense`` weights and the rest their pruned ones. The
    sensitivity is measured on ``fit``, the target on ``held``; ``reference`` holds the dense
    model's logits of both. ``ValueError`` (the weights all pruned again) when the target is not
    met while at least one layer stays sparse and at most ``target.max_dense`` layers are dense.
    """
    weights = _Weights(layers, dense, pruned)
    reference_fit, reference_held = reference
    rows = _rows(model, weights, masks, pattern, fit, reference_fit, progress)
    _, total = layer_macs(model, fit[0])
    for name in layers:
        weights.set(name, True)
    kl0, agreement0 = divergence(reference_held, model_logits(model, held))
    order = sorted(rows, key=lambda r: (-r.kl_per_mmac, -r.kl, r.name))
    limit = len(order) - 1 if target.max_dense is None else min(target.max_dense, len(order) - 1)
    kept: list[str] = []
    trace: list[tuple[str, float, float]] = []
    kl, agreement = kl0, agreement0
    for row in order:
        if target.met(agreement, kl) or len(kept) >= limit:
            break
        weights.set(row.name, False)
        kept.append(row.name)
        kl, agreement = divergence(reference_held, model_logits(model, held))
        trace.append((row.name, agreement, kl))
    if not target.met(agreement, kl):
        for name in kept:
            weights.set(name, True)
        best = max(trace, key=lambda t: (t[1], -t[2])) if trace else ("-", agreement0, kl0)
        bound = (
            "with one layer left sparse"
            if target.max_dense is None or target.max_dense >= len(order) - 1
            else f"within max_dense={target.max_dense} dense layers"
        )
        raise ValueError(
            f"keep_dense='auto': the target ({target.describe()}) is unreachable {bound}: all "
            f"{len(order)} layers pruned give agreement {agreement0:.2%} / KL {kl0:.4f} on the held-out "
            f"batches, {len(kept)} kept dense ({', '.join(kept) or '-'}) give agreement {agreement:.2%} / "
            f"KL {kl:.4f} (best on the way: agreement {best[1]:.2%}, KL {best[2]:.4f}); lower the target"
            + (" or raise max_dense" if target.max_dense is not None else "")
        )
    sparse = [n for n in layers if n not in kept]
    share0, executed0 = _shares(rows, layers, total)
    share, executed = _shares(rows, sparse, total)
    return DenseTargetReport(
        target, rows, kept, holdout, agreement0, kl0, agreement, kl, share0, share, executed0, executed,
        trace=trace,
    )  # fmt: skip
