"""YOPO as a mask method: the :func:`knsparse.pruning.score.yopo` scorer (batched NMF residual
saliency) under the :func:`select` rule."""

from __future__ import annotations

from collections.abc import Mapping

from ...core.pattern import Pattern
from ..score import yopo as yopo_scores
from .base import Decision, Layer
from .select import Mode, select


def yopo(
    layers: Mapping[str, Layer],
    pattern: Pattern | None,
    sparsity: float | None,
    *,
    rank: int = 7,
    iters: int = 200,
    seed: int = 0,
    mode: Mode = "layer",
    min_keep_row: int = 1,
) -> dict[str, Decision]:
    """k:n: the ``k`` highest YOPO scores of every group; unstructured: the lowest ``sparsity``
    fraction dropped per layer or (``mode="global"``, scores are in units of each layer's median
    ``|w|``) across layers. ``rank``, ``iters``, ``seed`` go to the whole-layer NMF fit of each
    reduction view."""
    if not layers:
        return {}
    scores = yopo_scores({n: lay.weight for n, lay in layers.items()}, rank=rank, iters=iters, seed=seed)
    return select(scores, pattern, sparsity, rule="yopo", mode=mode, min_keep_row=min_keep_row)
