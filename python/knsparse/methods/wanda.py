"""Wanda (Sun et al., 2023): prune by ``|w_ij| · ‖x_j‖`` within each output row (``wanda``)."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..masks import nm_mask
from ..pattern import Pattern
from .base import Decision, Layer, data_path_scores


def wanda(layers: Mapping[str, Layer], pattern: Pattern, sparsity: float | None) -> dict[str, Decision]:
    """k:n: the ``k`` largest scores of every group. Unstructured: the ``sparsity`` fraction of
    smallest scores of every output row (Wanda's per-output comparison group)."""
    out = {}
    for name, lay in layers.items():
        if lay.stats is None:
            raise ValueError(f"method 'wanda' needs calibration statistics for layer {name!r}")
        scores = data_path_scores(lay, 0.0)
        if pattern.is_unstructured:
            assert sparsity is not None
            drop = int(scores.shape[1] * sparsity)
            mask = torch.ones_like(scores, dtype=torch.bool)
            mask.scatter_(1, scores.argsort(dim=1)[:, :drop], False)
            target = sparsity
        else:
            mask, target = nm_mask(scores, pattern, name=name), pattern.sparsity
        out[name] = Decision(mask, f"wanda {pattern}", target)
    return out
