"""MP-guided per-layer sparsity budgets.

A layer whose spectrum is mostly a Marchenko–Pastur bulk holds a large random-like part that
can be removed cheaply; a layer with many spikes or a heavy tail (a poor MP fit) carries
learned structure and is protected. The *randomness* of a layer is

    r = bulk_energy · (1 - fit_error)

— the share of ``‖W‖_F²`` in bulk eigenvalues, discounted by the Kolmogorov–Smirnov distance
of the fit (a heavy-tailed bulk is not random-like even where no spike stands out). Budgets are

    s_l = clip(sigmoid(t + strength · (r_l - r̄)), lo, hi)

with ``r̄`` the parameter-weighted mean randomness and the offset ``t`` found by bisection so
that the parameter-weighted mean sparsity equals the global target (to ~1e-12; the sparsity is
monotone in ``t``). ``strength = 0`` gives the uniform allocation.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ..spectral import MPFit

_BISECTION_STEPS = 200


def mp_randomness(fit: MPFit) -> float:
    """``bulk_energy · (1 - fit_error)`` in [0, 1]: 1 for a pure MP bulk."""
    return fit.bulk_energy * (1.0 - fit.fit_error)


def mp_layer_sparsities(
    fits: Mapping[str, MPFit],
    numels: Mapping[str, int],
    sparsity: float,
    *,
    strength: float = 2.0,
    bounds: tuple[float, float] = (0.0, 0.95),
) -> dict[str, float]:
    """Per-layer sparsities whose parameter-weighted mean is ``sparsity``.

    Args:
        fits: MP fit of every layer.
        numels: number of weights of every layer (the weights of the mean).
        sparsity: the global target in ``[lo, hi]``.
        strength: how strongly randomness moves a layer's budget (logit units per unit of
            randomness); 0 is uniform.
        bounds: ``(lo, hi)`` clip of every layer's sparsity.

    Raises ``ValueError`` if the layers differ between ``fits`` and ``numels`` or the target
    is outside ``bounds``.
    """
    lo, hi = bounds
    if not 0.0 <= lo <= hi < 1.0:
        raise ValueError(f"bounds must satisfy 0 <= lo <= hi < 1, got {bounds}")
    if not lo <= sparsity <= hi:
        raise ValueError(f"target sparsity {sparsity} is outside the per-layer bounds {bounds}")
    if set(fits) != set(numels):
        raise ValueError(f"fits and numels name different layers: {sorted(set(fits) ^ set(numels))}")
    names = list(fits)
    if not names:
        return {}
    weights = torch.tensor([float(numels[n]) for n in names], dtype=torch.float64)
    rand = torch.tensor([mp_randomness(fits[n]) for n in names], dtype=torch.float64)
    centred = strength * (rand - (weights * rand).sum() / weights.sum())

    def allocate(t: float) -> torch.Tensor:
        return torch.sigmoid(t + centred).clamp(lo, hi)

    def mean(t: float) -> float:
        return float((weights * allocate(t)).sum() / weights.sum())

    # sigmoid(±60) is 1 - 1e-26 / 1e-26: the clipped mean spans [lo, hi] over this bracket.
    t_lo, t_hi = -60.0 - abs(strength), 60.0 + abs(strength)
    for _ in range(_BISECTION_STEPS):
        mid = (t_lo + t_hi) / 2
        if mean(mid) < sparsity:
            t_lo = mid
        else:
            t_hi = mid
        if t_hi - t_lo < 1e-13:
            break
    out = allocate((t_lo + t_hi) / 2)
    realised = float((weights * out).sum() / weights.sum())
    if not math.isclose(realised, sparsity, abs_tol=1e-6):
        raise ValueError(f"could not meet the target sparsity {sparsity} (got {realised}) within {bounds}")
    return {n: float(s) for n, s in zip(names, out, strict=True)}
