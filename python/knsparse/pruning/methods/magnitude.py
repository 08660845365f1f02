"""Magnitude pruning: the :func:`knsparse.pruning.score.magnitude` scorer under the :func:`select` rule."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ...core.layers import pattern_layers
from ...core.masks import from_reduction_view, to_reduction_view
from ...core.pattern import Pattern
from ..score import magnitude as magnitude_scores
from .base import Decision, Layer
from .select import Mode, select


def magnitude(
    layers: Mapping[str, Layer],
    pattern: Pattern | None,
    sparsity: float | None,
    *,
    mode: Mode = "layer",
    min_keep_row: int = 1,
) -> dict[str, Decision]:
    """k:n: the ``k`` largest ``|w|`` of every group. Unstructured: drop the ``sparsity``
    fraction of smallest ``|w|`` in every layer (``mode="layer"``) or across all layers at once
    (``mode="global"``); every output row keeps at least ``min_keep_row`` weights."""
    if not layers:
        return {}
    choose = {"rule": "magnitude", "mode": mode, "min_keep_row": min_keep_row}
    if pattern is None and mode == "global":  # one threshold: every layer's scores at once
        return select(
            magnitude_scores({n: lay.weight for n, lay in layers.items()}), pattern, sparsity, **choose
        )
    out: dict[str, Decision] = {}
    for name, lay in layers.items():  # one layer's |w| at a time: no copy of the whole model
        out.update(select(magnitude_scores({name: lay.weight}), pattern, sparsity, **choose))
    return out


def magnitude_masks(model: nn.Module, pattern: Pattern) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``{layer: k:n mask keeping the largest |w| per group}`` (each in its weight's shape) for
    every layer that can carry ``pattern``, and ``{layer: why not}`` for the other Linear /
    Conv2d layers (:func:`knsparse.core.layers.pattern_layers`). The model is not changed."""
    found, skipped = pattern_layers(model, pattern)
    if not found:
        return {}, skipped
    order = pattern.conv_order
    views = {n: to_reduction_view(m.weight.detach(), order) for n, m in found.items()}
    chosen = select(magnitude_scores(views), pattern, None, rule="magnitude")
    masks = {n: from_reduction_view(d.mask, found[n].weight.shape, order) for n, d in chosen.items()}
    return masks, skipped
