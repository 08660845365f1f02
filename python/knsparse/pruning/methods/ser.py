"""SER (sparsify–estimate–restore) and the Hybrid magnitude/SER schedule, for unstructured masks.

SER, per layer, at the MP-guided layer budget ``s_l`` (:mod:`knsparse.pruning.budget.mp_alloc`; layers
too small for an MP fit get ``s_l = 0`` and stay dense):

1. *Sparsify*: over-prune by magnitude into a reservoir — the smallest ``s_l + depth`` fraction.
2. *Estimate*: the mass magnitude pruning to ``s_l`` would remove, ``m = Σ w²`` over the
   smallest ``s_l`` fraction, against the MP budget — the energy of the layer's random-like
   part, ``b = bulk_energy · ‖W‖_F²``. The reservoir depth is ``reservoir · max(1, m / b)``:
   where magnitude pruning stays within the random-like mass it is trusted and the reservoir
   is shallow; where it would cut into learned (spike) mass, more of the decision is re-made
   on the data path (all of it when ``b`` is zero).
3. *Restore*: bring back the reservoir entries most useful on the data path until exactly
   ``s_l`` is met. The score is ``|w_ij|·sqrt((1 - α)‖x_j‖² + α ē)`` with calibration
   statistics (``ē`` the layer's mean column energy, ``α = shrinkage``), ``|w_ij|`` without.

*Why shrink.* ``‖x_j‖`` is estimated from a small calibration sample, and a one-shot mask
shifts the inputs of every later layer away from the ones measured. The score is the diagonal
of CAST's robust metric (:func:`knsparse.pruning.methods.cast.robust_gram`): it mixes the energy of
the calibration inputs with the mean energy, which holds for any inputs of the same total
energy. ``α = 0`` is the plain Wanda-style score ``|w_ij|·‖x_j‖``; ``α = 1`` is the magnitude.

Without calibration data (or with ``α = 1``) the restore score is the magnitude itself, so SER
reduces to layer-wise magnitude pruning at the MP-guided budgets.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Literal

import torch

from ...core.masks import unstructured_mask
from ...core.pattern import Pattern
from .base import Decision, Layer, data_path_scores, mp_budgets
from .magnitude import magnitude

SER_SHRINKAGE = 0.5
"""Default ``α`` of the restore score: chosen on held-out training images of the built-in digits
models by ``bench/quality_select.py`` (``bench/results/quality_select.json``)."""


def _require_unstructured(pattern: Pattern | None, method: str) -> None:
    if pattern is not None:
        raise ValueError(
            f"method {method!r} makes unstructured masks; for pattern {pattern} use 'cast' "
            "(optionally with sparsity= for an unstructured pre-mask with free restoration)"
        )


def ser_layer(
    layer: Layer, sparsity: float, *, reservoir: float, shrinkage: float, min_keep_row: int
) -> Decision:
    """SER mask of one layer at ``sparsity`` (see the module docstring)."""
    w = layer.weight
    numel = w.numel()
    n_prune = round(sparsity * numel)
    order = torch.sort(w.abs().reshape(-1), stable=True).indices  # ascending magnitude
    sq = w.reshape(-1).double().square()
    lost = float(sq[order[:n_prune]].sum())
    bulk_mass = layer.fit.bulk_energy * float(sq.sum())
    ratio = lost / bulk_mass if bulk_mass > 0 else math.inf
    depth = reservoir * max(1.0, ratio)
    n_over = numel if math.isinf(depth) else min(numel, n_prune + round(depth * numel))
    score = data_path_scores(layer, shrinkage).reshape(-1)
    # Base (never over-pruned) entries outrank every reservoir entry; the reservoir is ranked
    # by data-path score, so keeping the top (numel - n_prune) restores its best entries.
    priority = score / score.max().clamp_min(1e-30)
    priority[order[n_over:]] = 2.0
    mask = unstructured_mask(priority.reshape(w.shape), sparsity, min_keep_row)
    by_magnitude = torch.zeros(numel, dtype=torch.bool, device=w.device)
    by_magnitude[order[:n_prune]] = True
    restored = int((mask.reshape(-1) & by_magnitude).sum())
    return Decision(
        mask,
        "ser",
        sparsity,
        extra={"lost_mass_ratio": ratio, "reservoir": float(n_over - n_prune), "restored": float(restored)},
    )


def ser(
    layers: Mapping[str, Layer],
    pattern: Pattern | None,
    sparsity: float | None,
    *,
    reservoir: float = 0.1,
    shrinkage: float = SER_SHRINKAGE,
    min_eigenvalues: int = 16,
    max_sparsity: float = 0.95,
    min_keep_row: int = 1,
) -> dict[str, Decision]:
    """SER masks at MP-guided layer budgets whose parameter-weighted mean is ``sparsity``.

    ``reservoir`` is the base over-pruning depth (fraction of the layer's weights);
    ``shrinkage`` is ``α`` of the restore score (module docstring); ``min_eigenvalues`` and
    ``max_sparsity`` go to :func:`knsparse.pruning.budget.mp_layer_sparsities`.
    """
    _require_unstructured(pattern, "ser")
    assert sparsity is not None
    if reservoir < 0:
        raise ValueError(f"reservoir must be >= 0, got {reservoir}")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    budgets = mp_budgets(layers, sparsity, min_eigenvalues=min_eigenvalues, max_sparsity=max_sparsity)
    return {
        n: ser_layer(lay, budgets[n], reservoir=reservoir, shrinkage=shrinkage, min_keep_row=min_keep_row)
        for n, lay in layers.items()
    }


def hybrid(
    layers: Mapping[str, Layer],
    pattern: Pattern | None,
    sparsity: float | None,
    *,
    switch: float = 0.5,
    mode: Literal["layer", "global"] = "layer",
    reservoir: float = 0.1,
    shrinkage: float = SER_SHRINKAGE,
    min_eigenvalues: int = 16,
    max_sparsity: float = 0.95,
    min_keep_row: int = 1,
) -> dict[str, Decision]:
    """Magnitude pruning (``mode``) up to the ``switch`` sparsity, SER above it."""
    _require_unstructured(pattern, "hybrid")
    assert sparsity is not None
    if sparsity <= switch:
        chosen = magnitude(layers, pattern, sparsity, mode=mode, min_keep_row=min_keep_row)
    else:
        chosen = ser(
            layers,
            pattern,
            sparsity,
            reservoir=reservoir,
            shrinkage=shrinkage,
            min_eigenvalues=min_eigenvalues,
            max_sparsity=max_sparsity,
            min_keep_row=min_keep_row,
        )
    for d in chosen.values():
        d.rule = f"hybrid/{d.rule}"
    return chosen
