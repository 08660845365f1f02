"""Multiply-accumulate (MAC) accounting: dense vs sparse execution, per layer.

Counted by forward hooks on one real forward pass, so every shape is the one the model
actually runs (token merging included):

- Linear-like layers: ``in_features * out_features`` per input row;
- Conv2d-like layers: ``(Cin / groups) * R * S`` per output element;
- attention: ``q @ kᵀ`` and ``softmax @ v``, ``2 * N² * heads * head_dim`` per image
  (read off the fused ``qkv`` projection's output, so ToMe-patched blocks are counted too).

Biases, norms, activations and softmax are not counted (the convention behind the published
17.56 G for ViT-B/16 and 4.09 G for ResNet-50).

Only layers that a sparse backend executes count as reduced: swapped sparse modules (their
pattern's density ``k / n`` of the MACs), or, with ``masks``, layers that would be swapped —
the mask is k:n and the eligibility rule accepts the layer. A dense layer whose weights merely
hold zeros is still executed densely and keeps its full count.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass

import torch
from torch import nn

from ..core.checks import check_image_shape, check_module
from ..core.layers import layer_kind, placement_reasons, swap_ineligibility, weight_macs
from ..core.pattern import Pattern
from ..core.plan import SparsityPlan, as_plan
from ..integrations import families
from ..sparse.modules import SparseConv2d, SparseLinear
from ..utils.batches import Batch
from ..utils.modes import evaluation
from ..utils.renamed import renamed
from . import tome

# (layer name, module, mask) -> None if a sparse backend would run the layer, else the reason.
EligibilityRule = Callable[[str, nn.Module, torch.Tensor], "str | None"]


@dataclass(frozen=True)
class LayerMacs:
    """MACs of one layer for one forward pass of the whole input (all images of the batch)."""

    name: str
    kind: str  # "linear", "conv" or "attention"
    dense: int
    sparse: int
    executor: str  # "dense", "sparse <pattern> (<backend>)", "sparse <pattern> (mask)"
    note: str = ""


@dataclass(frozen=True)
class MacReport:
    """Per-layer MACs and totals for one forward pass of ``input_shape``.

    ``layers`` are counted with the token merging of ``merges_per_block`` (if any);
    ``unmerged_dense_total`` is the dense count of the same model without merging.
    """

    input_shape: tuple[int, ...]
    merges_per_block: tuple[int, ...]
    layers: tuple[LayerMacs, ...]
    unmerged_dense_total: int

    @property
    def dense_total(self) -> int:
        return sum(layer.dense for layer in self.layers)

    @property
    def sparse_total(self) -> int:
        return sum(layer.sparse for layer in self.layers)

    @property
    def reduction(self) -> float:
        """Fraction of the plain dense model's MACs skipped by sparse execution and merging."""
        return 1.0 - self.sparse_total / self.unmerged_dense_total

    @property
    def sparse_reduction(self) -> float:
        """Fraction skipped by sparse execution alone (at the merged token counts)."""
        return 1.0 - self.sparse_total / self.dense_total

    @property
    def merge_reduction(self) -> float:
        """Fraction of the dense MACs skipped by token merging alone."""
        return 1.0 - self.dense_total / self.unmerged_dense_total

    @property
    def theoretical_speedup(self) -> float:
        """``1 / (1 - reduction)``: the speed-up if time were proportional to MACs."""
        return self.unmerged_dense_total / self.sparse_total

    def per_image(self, total: int) -> float:
        """``total`` MACs divided by the batch size of ``input_shape``."""
        return total / self.input_shape[0]

    def to_dict(self) -> dict:
        return {
            "input_shape": list(self.input_shape),
            "merges_per_block": list(self.merges_per_block),
            "unmerged_dense_gmacs_per_image": self.per_image(self.unmerged_dense_total) / 1e9,
            "dense_gmacs_per_image": self.per_image(self.dense_total) / 1e9,
            "sparse_gmacs_per_image": self.per_image(self.sparse_total) / 1e9,
            "reduction": self.reduction,
            "sparse_reduction": self.sparse_reduction,
            "merge_reduction": self.merge_reduction,
            "theoretical_speedup": self.theoretical_speedup,
            "layers": [asdict(layer) for layer in self.layers],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def summary(self) -> str:
        """One line: GMACs per image and the reductions."""
        merged = any(self.merges_per_block)
        parts = [f"dense {self.per_image(self.unmerged_dense_total) / 1e9:.3f} GMACs/image"]
        if merged:
            parts.append(f"with token merging {self.per_image(self.dense_total) / 1e9:.3f}")
        parts += [
            f"sparse execution {self.per_image(self.sparse_total) / 1e9:.3f}",
            f"reduction {100 * self.reduction:.1f}%"
            + (
                f" (sparsity {100 * self.sparse_reduction:.1f}%, merging {100 * self.merge_reduction:.1f}%)"
                if merged
                else ""
            ),
            f"theoretical speed-up {self.theoretical_speedup:.2f}x",
        ]
        return ", ".join(parts)

    def to_markdown(self, per_layer: bool = True) -> str:
        """The summary line and, with ``per_layer``, one row per layer (MACs in millions)."""
        lines = [self.summary()]
        if per_layer:
            lines += [
                "",
                "| layer | kind | dense MMACs | sparse MMACs | executed as | why dense |",
                "| --- | --- | ---: | ---: | --- | --- |",
            ]
            for m in self.layers:
                dense, sparse = f"{m.dense / 1e6:.2f}", f"{m.sparse / 1e6:.2f}"
                lines.append(f"| {m.name} | {m.kind} | {dense} | {sparse} | {m.executor} | {m.note} |")
        return "\n".join(lines)


def default_eligibility(pattern: Pattern) -> EligibilityRule:
    """:func:`knsparse.swap_modules`' rule: a ``Linear``/``Conv2d`` it would swap for this mask."""

    def rule(name: str, module: nn.Module, mask: torch.Tensor) -> str | None:
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            return f"{type(module).__name__} is not a Linear or Conv2d"
        return swap_ineligibility(name, module, mask, pattern)

    return rule


@contextmanager
def _merging(model: nn.Module, tome_r: int | Sequence[int]):
    wanted = tome_r if isinstance(tome_r, int) else any(tome_r)
    if not wanted:
        yield
        return
    if tome.is_applied(model):
        raise ValueError("the model already has token merging applied; pass tome_r=0 to count it as patched")
    tome.apply(model, tome_r)
    try:
        yield
    finally:
        tome.remove(model)


@contextmanager
def _merging_removed(model: nn.Module):
    merges = tome.merges_per_block(model)
    tome.remove(model)
    try:
        yield
    finally:
        tome.apply(model, merges)


def _example_input(model: nn.Module, input_shape: Sequence[int]) -> torch.Tensor:
    shape = check_image_shape(input_shape)
    param = next((p for p in model.parameters() if p.is_floating_point()), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None else torch.float32
    return torch.randn(shape, generator=torch.Generator().manual_seed(0)).to(device, dtype)


@renamed(masks="plan")
def macs(
    model: nn.Module,
    input_shape: Sequence[int],
    plan: SparsityPlan | Mapping[str, torch.Tensor] | None = None,
    tome_r: int | Sequence[int] = 0,
    pattern: str | Pattern | None = None,
    eligible: EligibilityRule | None = None,
) -> MacReport:
    """Count dense and sparse-execution MACs of one forward pass.

    Args:
        model: any ``nn.Module`` (left unchanged; it runs once in eval mode without grad).
        input_shape: ``(B, C, H, W)`` or ``(C, H, W)`` (batch 1).
        plan: a :class:`~knsparse.core.plan.SparsityPlan` (``prune(...).plan``) or
            ``{layer name: bool mask of its weight}`` for layers that *would* be swapped;
            layers already swapped to sparse modules count from their own pattern.
        tome_r: token merges per block applied for this count (0: none, or the model's own
            patch if it is already patched).
        pattern: the pattern a backend runs for a mask dict (default ``"2:4"``; a plan has its own).
        eligible: the swap rule for masked layers (default :func:`default_eligibility`).

    Returns:
        A :class:`MacReport` with one row per weight layer and per attention block.
    """
    check_module(model, meta="whole")
    check_image_shape(input_shape)
    if eligible is not None and not callable(eligible):
        raise TypeError(
            f"eligible must be a callable (name, module, mask) -> reason, got {type(eligible).__name__}"
        )
    tome.merge_schedule(model, tome_r, "tome_r")
    plan = as_plan(plan if plan is not None else {}, pattern)
    pattern, masks = plan.pattern, dict(plan.masks)
    named = dict(model.named_modules(remove_duplicate=False))
    unknown = sorted(set(masks) - set(named))
    if unknown:
        raise ValueError(f"masks name layers the model does not have: {unknown[:5]}")
    for name, mask in masks.items():
        weight = getattr(named[name], "weight", None)
        if not isinstance(weight, torch.Tensor) or mask.shape != weight.shape:
            shape = tuple(weight.shape) if isinstance(weight, torch.Tensor) else "no weight"
            raise ValueError(f"layer {name!r}: mask shape {tuple(mask.shape)} != weight shape {shape}")
    rule = eligible or default_eligibility(pattern)
    placement = placement_reasons(model)
    why_dense = {
        name: placement.get(name) or rule(name, named[name], mask) or "" for name, mask in masks.items()
    }
    x = _example_input(model, input_shape)
    label = f"input_shape {tuple(input_shape)}"
    with evaluation(model), torch.no_grad(), _merging(model, tome_r):
        rows = _count(model, x, why_dense, pattern, label)
        merges = tuple(tome.merges_per_block(model))
        unmerged = sum(r.dense for r in rows)
        if any(merges):
            with _merging_removed(model):
                unmerged = sum(r.dense for r in _count(model, x, why_dense, pattern, label))
    # a layer its parent reads directly, or a second name of one module, never runs as itself
    never_ran = sorted(set(masks) - {r.name for r in rows} - set(placement))
    if never_ran:
        raise ValueError(
            f"masked layers never ran in the forward pass (or are not Linear/Conv2d): {never_ran[:5]}"
        )
    return MacReport(tuple(x.shape), merges, tuple(rows), unmerged)


def _count(
    model: nn.Module,
    x: torch.Tensor,
    why_dense: Mapping[str, str],
    pattern: Pattern,
    label: str,
) -> list[LayerMacs]:
    """One hooked forward pass of ``x``; a row per weight layer call and per attention call.

    ``why_dense``: for every masked layer, why it stays dense ("" if a backend would take it);
    ``label``: how an input the model cannot take is named in the ``ValueError``.
    """
    rows: list[LayerMacs] = []
    counted: set[str] = set()

    def weight_hook(name: str, kind: str):
        def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
            dense = weight_macs(kind, module, args[0], output)
            executor, sparse, note = "dense", dense, ""
            if isinstance(module, (SparseLinear, SparseConv2d)):
                executor = f"sparse {module.pattern} ({module.active_backend})"
                sparse = dense * module.pattern.k // module.pattern.n
            elif name in why_dense:
                note = why_dense[name]
                if not note:
                    executor, sparse = f"sparse {pattern} (mask)", dense * pattern.k // pattern.n
            rows.append(LayerMacs(name, kind, dense, sparse, executor, note))

        return hook

    def attention_hook(name: str, heads: int, head_dim: int):
        def hook(_module: nn.Module, _args: tuple, qkv_out: torch.Tensor) -> None:
            b, n = qkv_out.shape[0], qkv_out.shape[1]
            count = 2 * b * n * n * heads * head_dim
            rows.append(LayerMacs(f"{name}.matmul", "attention", count, count, "dense"))

        return hook

    handles = []
    try:
        for name, module in model.named_modules():
            if any(name.startswith(f"{c}.") for c in counted):
                continue  # the internals of a counted layer
            kind = layer_kind(module)
            if kind is not None and name:
                counted.add(name)
                handles.append(module.register_forward_hook(weight_hook(name, kind)))
            if (parts := families.attention_parts(module)) is not None:
                qkv, proj, head_dim = parts
                hook = attention_hook(name, proj.in_features // head_dim, head_dim)
                handles.append(qkv.register_forward_hook(hook))
        Batch((x,), label=label)(model, locate=True)
    finally:
        for h in handles:
            h.remove()
    return rows
