"""Classical random-matrix (RMT) denoising baseline.

Every layer is replaced by its rank-``k`` SVD reconstruction, ``k`` = the number of MP spikes
(singular values above the fitted edge plus its Tracy–Widom margin; at least 1 so a layer is
never zeroed), which drops the sub-edge — random-like — singular component. The reconstruction
is then sparsified by magnitude to the target (uniform per layer, or the k:n pattern). Unlike
the other methods this changes the kept weights' values, not only the mask.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...core.pattern import Pattern
from .base import Decision, Layer
from .select import select


def denoise(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``weight`` ``[out, K]`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def rmt(
    layers: Mapping[str, Layer], pattern: Pattern | None, sparsity: float | None, *, min_keep_row: int = 1
) -> dict[str, Decision]:
    ranks = {n: max(1, lay.fit.num_spikes) for n, lay in layers.items()}
    clean = {n: denoise(lay.weight, ranks[n]) for n, lay in layers.items()}
    chosen = select(
        {n: c.abs() for n, c in clean.items()}, pattern, sparsity, rule="rmt", min_keep_row=min_keep_row
    )
    for n, d in chosen.items():
        d.rule, d.weight, d.extra = "rmt", clean[n], {"rank": float(ranks[n])}
    return chosen
