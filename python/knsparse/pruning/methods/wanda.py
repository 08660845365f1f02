"""Wanda (Sun et al., 2023): the data-path score ``|w_ij| · ‖x_j‖`` under the :func:`select`
rule (``wanda``): k:n per group, or unstructured per layer / globally."""

from __future__ import annotations

from collections.abc import Mapping

from ...core.pattern import Pattern
from .base import Decision, Layer, data_path_scores
from .select import Mode, select


def wanda(
    layers: Mapping[str, Layer], pattern: Pattern | None, sparsity: float | None, *, mode: Mode = "layer"
) -> dict[str, Decision]:
    """Keep the highest ``|w_ij| · ‖x_j‖`` (CAST's data-path score without shrinkage)."""
    for name, lay in layers.items():
        if lay.stats is None:
            raise ValueError(f"method 'wanda' needs calibration statistics for layer {name!r}")
    scores = {n: data_path_scores(lay, 0.0) for n, lay in layers.items()}
    return select(scores, pattern, sparsity, rule="wanda", mode=mode)
