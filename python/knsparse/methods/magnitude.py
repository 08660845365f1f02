"""Magnitude pruning: keep the largest ``|w|``, per layer or with one global threshold."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Literal

from ..masks import global_unstructured_masks, nm_mask, unstructured_mask
from ..pattern import Pattern
from .base import Decision, Layer


def magnitude(
    layers: Mapping[str, Layer],
    pattern: Pattern,
    sparsity: float | None,
    *,
    mode: Literal["layer", "global"] = "layer",
    min_keep_row: int = 1,
) -> dict[str, Decision]:
    """k:n: the ``k`` largest ``|w|`` of every group. Unstructured: drop the ``sparsity``
    fraction of smallest ``|w|`` in every layer (``mode="layer"``) or across all layers at once
    (``mode="global"``); every output row keeps at least ``min_keep_row`` weights."""
    if not pattern.is_unstructured:
        return {
            n: Decision(nm_mask(lay.weight.abs(), pattern, name=n), f"magnitude {pattern}", pattern.sparsity)
            for n, lay in layers.items()
        }
    assert sparsity is not None
    if mode == "global":
        masks = global_unstructured_masks(
            {n: lay.weight.abs() for n, lay in layers.items()}, sparsity, min_keep_row
        )
        return {n: Decision(masks[n], "magnitude (global)", sparsity) for n in layers}
    if mode != "layer":
        raise ValueError(f"magnitude mode must be 'layer' or 'global', got {mode!r}")
    return {
        n: Decision(unstructured_mask(lay.weight.abs(), sparsity, min_keep_row), "magnitude", sparsity)
        for n, lay in layers.items()
    }
