r"""EMP: how many weights to keep from the effective number of the score distribution.

For scores ``s`` (any shape, ``N`` entries) let ``ω = |s| / Σ|s|``, the share of the total
saliency each weight holds. The effective number (inverse participation ratio)

    N_eff = floor(β / Σ ω_i²),  clipped to [1, N]

counts how many weights carry the mass: ``N`` for equal scores, 1 for a single dominant one.
Keeping the ``N_eff`` highest ``|s|`` is a data-driven budget with no sparsity to choose; ``β``
scales it. An all-zero score vector is treated as the limit of equal scores (``ω`` uniform).

**Kept-mass bound** (:func:`emp_mass_bound`). Sort ``ω_(1) >= ... >= ω_(N)``, let
``k = N_eff``, ``S₂ = Σ ω_i²`` and ``K = ω_(1) + ... + ω_(k)`` the kept mass. Then

1. ``K >= k / N``: the ``k`` largest shares average at least the mean share ``1 / N``.
2. ``S₂ > β / (k + 1)``: if ``k = floor(β/S₂)`` then ``β/S₂ < k + 1``; if ``k = 1`` was clipped
   up from 0 then ``S₂ > β >= β/2``. (``k = N`` clipped down keeps everything: ``K = 1``.)
3. ``S₂ <= K² + K(1 - K)/k``: the kept terms give ``Σ_{i<=k} ω_(i)² <= (Σ_{i<=k} ω_(i))² = K²``;
   every dropped share is at most ``ω_(k) <= K/k`` and they sum to ``1 - K``, so
   ``Σ_{i>k} ω_(i)² <= (K/k)(1 - K)``.

From 2 and 3, ``(k - 1) K² + K > k β / (k + 1)``; the left side increases with ``K >= 0``, so
``K`` exceeds its positive root ``K* = (sqrt(1 + 4 (k - 1) k β / (k + 1)) - 1) / (2 (k - 1))``
(``K* = β/2`` for ``k = 1``). Hence

    K >= min(1, max(k / N, K*)).

It is nearly tight: one share ``a`` plus ``N - 1`` equal small ones has ``K ≈ a + (k - 1)/N``
while ``K* ≈ a`` for large ``N``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from knsparse.core.checks import check_number, check_tensor
from knsparse.core.masks import global_unstructured_masks, unstructured_mask


def _shares(a: torch.Tensor, dim: int | None = None) -> torch.Tensor:
    """``|s| / Σ|s|`` in float64 (uniform where the sum is zero), over all entries or along ``dim``."""
    a = a.detach().abs().double()
    total = a.sum() if dim is None else a.sum(dim=dim, keepdim=True)
    count = a.numel() if dim is None else a.shape[dim]
    return torch.where(total > 0, a / torch.where(total > 0, total, 1.0), 1.0 / count)


def _effective(omega: torch.Tensor, beta: float, dim: int | None = None) -> torch.Tensor:
    s2 = (omega**2).sum() if dim is None else (omega**2).sum(dim=dim)
    n = omega.numel() if dim is None else omega.shape[dim]
    # The relative slack absorbs the rounding of Σω² (uniform ω must give exactly N); it only
    # strengthens step 2 of the bound: β/S₂ < k + 1 still holds.
    return torch.floor(beta / s2 * (1 + 1e-9)).clamp(1, n).long()


def _check(scores: torch.Tensor, beta: float, name: str | None = None) -> None:
    check_number(beta, "beta", low=0.0, low_open=True)
    check_tensor(scores, f"layer {name!r}: scores" if name else "scores", floating=False)
    if bool(torch.isnan(scores).any()):
        raise ValueError(f"{'layer ' + repr(name) if name else 'scores'}: scores contain NaN")


def emp_keep(scores: torch.Tensor, beta: float = 1.0) -> int:
    """``N_eff = floor(β / Σ ω²)`` with ``ω = |s| / Σ|s|``, clipped to ``[1, N]``."""
    _check(scores, beta)
    return int(_effective(_shares(scores), beta))


def emp_mask(scores: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Bool mask keeping the ``emp_keep(scores, β)`` highest ``|s|`` of the tensor (ties: lowest index)."""
    n_keep = emp_keep(scores, beta)
    return unstructured_mask(scores.detach().abs(), 1.0 - n_keep / scores.numel(), min_keep_row=0)


def emp_row_masks(scores: torch.Tensor, beta: float = 1.0) -> torch.Tensor:
    """Per output row: each row ``[in*kh*kw]`` keeps its own ``N_eff`` highest ``|s|``."""
    _check(scores, beta)
    if scores.dim() < 2:
        raise ValueError(f"scores must have rows (2-D or more), got shape {tuple(scores.shape)}")
    rows = scores.detach().reshape(scores.shape[0], -1)
    n_keep = _effective(_shares(rows, dim=1), beta, dim=1)
    order = torch.sort(rows.abs(), dim=1, descending=True, stable=True).indices
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(rows.shape[1], device=rows.device).expand_as(order))
    return (rank < n_keep[:, None].to(rank.device)).reshape(scores.shape)


def emp_global_masks(scores: Mapping[str, torch.Tensor], beta: float = 1.0) -> dict[str, torch.Tensor]:
    """One ``N_eff`` over all layers pooled (``ω`` normalised by the total ``Σ|s|`` of the model);
    the ``N_eff`` highest ``|s|`` anywhere are kept. Scores must be comparable across layers."""
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a {{layer name: scores}} mapping, got {type(scores).__name__}")
    if not scores:
        return {}
    for name, s in scores.items():
        _check(s, beta, name)
    flat = torch.cat([s.detach().abs().double().flatten().cpu() for s in scores.values()])
    n_keep = int(_effective(_shares(flat), beta))
    mags = {name: s.detach().abs() for name, s in scores.items()}
    return global_unstructured_masks(mags, 1.0 - n_keep / flat.numel(), min_keep_row=0)


def emp_mass_bound(n: int, n_eff: int, beta: float = 1.0) -> float:
    """Lower bound on the share of ``Σ|s|`` kept by the ``n_eff`` highest of ``n`` scores, where
    ``n_eff`` came from :func:`emp_keep` with the same ``beta`` (derivation in the module docstring):
    ``min(1, max(n_eff / n, K*))``."""
    check_number(n, "n", low=1, integer=True)
    check_number(n_eff, "n_eff", low=1, high=n, integer=True)
    check_number(beta, "beta", low=0.0, low_open=True)
    if n_eff == n:
        return 1.0
    k = n_eff
    root = beta / 2 if k == 1 else (math.sqrt(1 + 4 * (k - 1) * k * beta / (k + 1)) - 1) / (2 * (k - 1))
    return min(1.0, max(k / n, root))
