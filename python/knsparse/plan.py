"""The contract between the stages: one frozen :class:`SparsityPlan`.

:func:`knsparse.prune` decides a k:n plan — the pattern, how conv weights are grouped, one bool
mask per layer and the channel permutation it applied first — and every later stage takes it:
:func:`knsparse.swap_modules`, :func:`knsparse.macs`, :func:`knsparse.audit`,
:func:`knsparse.export_onnx`. Those stages also accept a plain ``{layer: mask}`` dict with a
pattern; :func:`as_plan` turns either into a plan at their entry, so the pattern is parsed and
the masks are checked once, there.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

import torch

from .masks import ConvOrder, bool_masks
from .pattern import Pattern

if TYPE_CHECKING:
    from .permutation import PermutationReport

CONV_ORDERS = ("rsc", "crs")


@dataclass(frozen=True)
class SparsityPlan:
    """A k:n plan for a model.

    Attributes:
        pattern: the k:n pattern every mask follows.
        masks: read-only ``{module name: bool mask}``, each in its weight's shape.
        conv_order: how conv weights are grouped, ``"rsc"`` (TensorRT) or ``"crs"``.
        permutation: the channel permutation :func:`knsparse.prune` applied before choosing the
            masks (already applied to the model it returned), or ``None``.
    """

    pattern: Pattern
    masks: Mapping[str, torch.Tensor]
    conv_order: ConvOrder = "rsc"
    permutation: PermutationReport | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a knsparse.Pattern, got {type(self.pattern).__name__}")
        if self.conv_order not in CONV_ORDERS:
            raise ValueError(f"conv_order must be 'rsc' or 'crs', got {self.conv_order!r}")
        object.__setattr__(self, "masks", MappingProxyType(bool_masks(self.masks)))

    def __len__(self) -> int:
        return len(self.masks)


def as_plan(
    masks: SparsityPlan | Mapping[str, torch.Tensor] | Any,
    pattern: str | Pattern | None = None,
    conv_order: ConvOrder | None = None,
) -> SparsityPlan:
    """The plan a stage works from: ``masks`` as given (a :class:`SparsityPlan`, or anything
    with a ``plan`` attribute such as :class:`knsparse.prune.PruneResult`), or a plan built from a
    ``{layer: mask}`` dict with ``pattern`` (default ``"2:4"``) and ``conv_order`` (default
    ``"rsc"``). A ``pattern`` / ``conv_order`` that contradicts a given plan is a ``ValueError``."""
    plan = getattr(masks, "plan", masks)
    if isinstance(plan, SparsityPlan):
        if pattern is not None and Pattern.parse(pattern) != plan.pattern:
            raise ValueError(f"pattern {str(pattern)!r} contradicts the plan's pattern {plan.pattern}")
        if conv_order is not None and conv_order != plan.conv_order:
            raise ValueError(
                f"conv_order {conv_order!r} contradicts the plan's conv_order {plan.conv_order!r}"
            )
        return plan
    if plan is None:
        raise TypeError(
            "expected a SparsityPlan or a {layer: mask} dict, got None "
            "(an unstructured prune has no k:n plan)"
        )
    return SparsityPlan(Pattern.parse(pattern if pattern is not None else "2:4"), plan, conv_order or "rsc")
