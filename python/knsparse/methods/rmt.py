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

from ..masks import nm_mask, unstructured_mask
from ..pattern import Pattern
from .base import Decision, Layer


def denoise(weight: torch.Tensor, rank: int) -> torch.Tensor:
    """Best rank-``rank`` approximation of ``weight`` ``[out, K]`` (truncated SVD)."""
    u, s, vh = torch.linalg.svd(weight.double(), full_matrices=False)
    return ((u[:, :rank] * s[:rank]) @ vh[:rank]).to(weight.dtype)


def rmt(
    layers: Mapping[str, Layer], pattern: Pattern, sparsity: float | None, *, min_keep_row: int = 1
) -> dict[str, Decision]:
    out = {}
    for n, lay in layers.items():
        rank = max(1, lay.fit.num_spikes)
        clean = denoise(lay.weight, rank)
        if pattern.is_unstructured:
            assert sparsity is not None
            mask, target = unstructured_mask(clean.abs(), sparsity, min_keep_row), sparsity
        else:
            mask, target = nm_mask(clean.abs(), pattern, name=n), pattern.sparsity
        out[n] = Decision(mask, "rmt", target, weight=clean, extra={"rank": float(rank)})
    return out
