"""What a mask method receives and returns.

Methods work on *reduction views*: every weight is a 2-D ``[out, K]`` matrix whose columns run
along the GEMM reduction axis (conv weights in the order chosen by ``conv_order``, see
:mod:`knsparse.core.masks`), so k:n groups are ``n`` consecutive columns and calibration statistics
line up column by column. The orchestrator (:func:`knsparse.prune`) maps masks back to the
weight's own shape.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from ..budget.mp_alloc import mp_layer_sparsities
from ..calibration import InputStats
from ..spectral import MPFit
from .obs import damped


@dataclass(frozen=True)
class Layer:
    """One prunable layer as a method sees it."""

    name: str
    weight: torch.Tensor
    """``[out, K]`` float32 reduction view (a copy: methods never touch the model)."""
    is_conv: bool
    fit: MPFit | None = None
    """The Marchenko–Pastur fit of the weight, when the method needs one (``MethodSpec.spectra``)
    or the diagnostics ask for it; ``None`` otherwise."""
    stats: InputStats | None = None
    """GEMM-input statistics on the calibration set, when one was given."""


@dataclass
class Decision:
    """A method's verdict on one layer, in reduction view."""

    mask: torch.Tensor
    """``[out, K]`` bool, True = kept."""
    rule: str
    """What chose the mask, e.g. ``"magnitude"``, ``"ser"``, ``"cast"``."""
    target_sparsity: float
    weight: torch.Tensor | None = None
    """Replacement values ``[out, K]`` when the method changes weights (``rmt``), else None."""
    freely_restored: int = 0
    """Entries an earlier unstructured mask had pruned that k:n execution brings back for free."""
    extra: dict[str, float] = field(default_factory=dict)
    """Method-specific per-layer numbers for the report."""
    fallback: str | None = None
    """Why the method did less than it would on this layer (statistics too thin for the re-fit,
    all-zero calibration inputs, ...); ``None`` when it ran in full."""


def mp_budgets(
    layers: Mapping[str, Layer], sparsity: float, *, min_eigenvalues: int, max_sparsity: float
) -> dict[str, float]:
    """MP-guided per-layer sparsities (:func:`knsparse.pruning.budget.mp_layer_sparsities`)."""
    return mp_layer_sparsities(
        {n: lay.fit for n, lay in layers.items()},
        {n: lay.weight for n, lay in layers.items()},
        sparsity,
        min_eigenvalues=min_eigenvalues,
        max_sparsity=max_sparsity,
    )


def data_path_scores(layer: Layer, shrinkage: float = 0.0) -> torch.Tensor:
    """``|w_ij| · sqrt((1 - α) ‖x_j‖² + α ē)`` with calibration statistics, ``|w_ij|`` without.

    ``‖x_j‖²`` is column ``j``'s mean input energy per sample, ``ē`` its mean over the columns
    and ``α = shrinkage``: the diagonal of CAST's robust Gram ``(1 - α) H + α h̄ I``
    (:func:`knsparse.pruning.methods.cast.robust_gram`). ``α = 0`` is Wanda's ``|w_ij|·‖x_j‖``;
    ``α = 1`` ranks like the magnitude. Shape ``[out, K]`` like the layer's weight.
    """
    mag = layer.weight.abs()
    if layer.stats is None:
        return mag
    energy = layer.stats.column_norms().to(mag.device).square()
    return mag * ((1 - shrinkage) * energy + shrinkage * energy.mean()).sqrt()


def layer_hessian(lay: Layer, method: str, damp: float) -> torch.Tensor:
    """The damped ``[K, K]`` float64 Gram of ``lay`` (:func:`knsparse.pruning.methods.obs.damped`);
    ``ValueError`` naming the layer without calibration statistics,
    :class:`~knsparse.pruning.methods.obs.UnusableGram` with all-zero inputs."""
    if lay.stats is None:
        raise ValueError(f"method {method!r} needs calibration statistics for layer {lay.name!r}")
    return damped(lay.stats.hessian(lay.name), damp, lay.name)


def fallback_scores(lay: Layer) -> tuple[torch.Tensor, str]:
    """``(scores, rule)`` of the scorer alone for a layer whose Gram cannot drive a reconstruction:
    Wanda's ``|w|·‖x‖`` when the calibration inputs carry any energy, else the magnitude."""
    if lay.stats is not None and bool((lay.stats.sum_sq > 0).any()):
        return data_path_scores(lay, 0.0), "wanda"
    return lay.weight.abs(), "magnitude"
