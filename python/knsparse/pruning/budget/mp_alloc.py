"""MP-guided per-layer sparsity budgets.

The Marchenko–Pastur fit of a layer gives its bulk standard deviation ``σ_l``: the per-entry
scale of the random-like part of the weight. Budgets come from one global ranking of the
*noise-normalised magnitudes* ``|w_ij| / σ_l``: the globally smallest ones are pruned until the
target count is met, and a layer's budget is the share of its weights that ranking removes.
Equivalently there is one threshold ``τ`` (in units of each layer's own noise level) and layer
``l`` loses its entries below ``τ σ_l``.

Why this follows the MP picture. Entries below ``τ σ_l`` are indistinguishable in size from the
fitted bulk; removing them removes a component whose entries are bounded by ``τ σ_l``, i.e. of
the order of the layer's MP edge ``σ+``. A layer that is mostly bulk (MP-like, random-like) has
most of its entries within a few ``σ_l`` and gets a large budget; a layer with heavy tails or
many spikes carries learned entries far above its ``σ_l`` and is protected. Layers whose
spectrum is too short to separate a bulk from spikes (``M < min_eigenvalues``, e.g. a
10-class head or a 4-pixel patch embedding) get no reliable ``σ_l`` and stay dense.

The parameter-weighted mean of the budgets equals the target up to one weight
(``round(target · total) / total``), also when the per-layer cap ``max_sparsity`` binds: capped
layers are fixed and the remaining count is re-ranked among the others.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from ...core.checks import check_number, check_tensor
from ..spectral import MPFit

_BISECTION_STEPS = 100


def _count_below(sorted_scores: dict[str, torch.Tensor], tau: float) -> dict[str, int]:
    return {
        n: int(torch.searchsorted(s, torch.tensor([tau], dtype=s.dtype))[0]) for n, s in sorted_scores.items()
    }


def _rank_counts(sorted_scores: dict[str, torch.Tensor], n_prune: int) -> dict[str, int]:
    """How many of each layer's smallest entries the ``n_prune`` globally smallest scores take."""
    lo, hi = 0.0, max(float(s[-1]) for s in sorted_scores.values()) * 2 + 1.0
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        if sum(_count_below(sorted_scores, mid).values()) <= n_prune:
            lo = mid
        else:
            hi = mid
    counts = _count_below(sorted_scores, lo)
    # entries tied at (or within float resolution of) the threshold: take the next smallest.
    for _ in range(n_prune - sum(counts.values())):
        nxt = {n: float(s[counts[n]]) for n, s in sorted_scores.items() if counts[n] < s.numel()}
        counts[min(nxt, key=nxt.__getitem__)] += 1
    return counts


def mp_layer_sparsities(
    fits: Mapping[str, MPFit],
    weights: Mapping[str, torch.Tensor],
    sparsity: float,
    *,
    min_eigenvalues: int = 16,
    max_sparsity: float = 0.95,
) -> dict[str, float]:
    """Per-layer sparsities whose parameter-weighted mean is ``sparsity`` (see module docstring).

    Args:
        fits: MP fit of every layer (its ``sigma2`` and spectrum length ``m`` are used).
        weights: every layer's weight (any shape); only ``|w|`` and the element count matter.
        sparsity: global target in ``[0, 1)``, as a fraction of all weights of ``weights``.
        min_eigenvalues: layers with fewer eigenvalues (or a zero bulk) stay dense.
        max_sparsity: cap of any one layer's sparsity.

    Raises ``ValueError`` if the layers of ``fits`` and ``weights`` differ, or the target cannot
    be met under the cap with the fittable layers.
    """
    for arg, values, kind in (("fits", fits, MPFit), ("weights", weights, torch.Tensor)):
        if not isinstance(values, Mapping):
            want = f"a {{layer name: {kind.__name__}}} mapping"
            raise TypeError(f"{arg} must be {want}, got {type(values).__name__}")
        for name, value in values.items():
            if not isinstance(value, kind):
                raise TypeError(f"{arg}[{name!r}] must be a {kind.__name__}, got {type(value).__name__}")
    for name, w in weights.items():
        check_tensor(w, f"weights[{name!r}]", floating=False)
    check_number(sparsity, "sparsity", low=0, high=1, high_open=True)
    check_number(max_sparsity, "max_sparsity", low=0, high=1, low_open=True, high_open=True)
    check_number(min_eigenvalues, "min_eigenvalues", low=0, integer=True)
    if set(fits) != set(weights):
        raise ValueError(f"fits and weights name different layers: {sorted(set(fits) ^ set(weights))}")
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
    if not 0.0 < max_sparsity < 1.0:
        raise ValueError(f"max_sparsity must be in (0, 1), got {max_sparsity}")
    numel = {n: w.numel() for n, w in weights.items()}
    total = sum(numel.values())
    n_prune = round(sparsity * total)
    fittable = [n for n in fits if fits[n].m >= min_eigenvalues and fits[n].sigma2 > 0]
    caps = {n: math.floor(max_sparsity * numel[n]) for n in fittable}
    if n_prune > sum(caps.values()):
        raise ValueError(
            f"target sparsity {sparsity} needs {n_prune} of {total} weights pruned, but the layers with an "
            f"MP fit (>= {min_eigenvalues} eigenvalues) can give at most {sum(caps.values())} under "
            f"max_sparsity={max_sparsity}"
        )
    counts = dict.fromkeys(fits, 0)
    pool = {
        n: (weights[n].detach().abs().reshape(-1).float() / math.sqrt(fits[n].sigma2)).sort().values.cpu()
        for n in fittable
    }
    remaining = n_prune
    while remaining and pool:
        ranked = _rank_counts(pool, remaining)
        over = [n for n in pool if ranked[n] > caps[n]]
        if not over:
            counts.update(ranked)
            break
        for n in over:
            counts[n] = caps[n]
            remaining -= caps[n]
            del pool[n]
    return {n: counts[n] / numel[n] if numel[n] else 0.0 for n in fits}
