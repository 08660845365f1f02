"""The mask rule of every score-based method: scores in, one :class:`Decision` per layer out.

A score-based method is a scorer from :mod:`knsparse.score` (or a data-path score) followed by
this rule: with a k:n pattern the ``k`` highest scores of every group are kept (the pattern is
the budget); without one, the budget is a sparsity — one fraction for every layer
(``mode="layer"``), one threshold across all layers (``mode="global"``), or a per-layer
``{name: sparsity}`` from :mod:`knsparse.budget` — and the lowest scores go.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

import torch

from ...core.masks import global_unstructured_masks, nm_mask, unstructured_mask
from ...core.pattern import Pattern
from .base import Decision

Mode = Literal["layer", "global"]


def select(
    scores: Mapping[str, torch.Tensor],
    pattern: Pattern | None,
    sparsity: float | Mapping[str, float] | None,
    *,
    rule: str,
    mode: Mode = "layer",
    min_keep_row: int = 1,
) -> dict[str, Decision]:
    """Masks keeping the highest ``scores`` (each ``[out, K]``, reduction view).

    Args:
        scores: ``{layer: scores}``; higher means more important.
        pattern: k:n groups along ``K``; ``None`` for unstructured masks at ``sparsity``.
        sparsity: the unstructured budget: one fraction, or ``{layer: fraction}``.
        rule: the method's name, recorded in each decision (the pattern is appended for k:n).
        mode: ``"layer"`` (each layer at its own sparsity) or ``"global"`` (one threshold; needs
            scores comparable across layers and a single sparsity).
        min_keep_row: unstructured masks keep at least this many entries per output row.
    """
    if pattern is not None:
        return {
            n: Decision(nm_mask(s, pattern, name=n), f"{rule} {pattern}", pattern.sparsity)
            for n, s in scores.items()
        }
    if sparsity is None:
        raise ValueError(f"method {rule!r} without a k:n pattern needs sparsity=<fraction>")
    if mode == "global":
        if isinstance(sparsity, Mapping):
            raise ValueError("mode='global' takes one sparsity for all layers, not one per layer")
        masks = global_unstructured_masks(scores, sparsity, min_keep_row)
        return {n: Decision(masks[n], f"{rule} (global)", sparsity) for n in scores}
    if mode != "layer":
        raise ValueError(f"mode must be 'layer' or 'global', got {mode!r}")
    per_layer = sparsity if isinstance(sparsity, Mapping) else dict.fromkeys(scores, sparsity)
    return {
        n: Decision(unstructured_mask(s, per_layer[n], min_keep_row), rule, per_layer[n])
        for n, s in scores.items()
    }
