"""MORT: exact-budget re-thresholding of saliency scores by robust outlier thresholds.

Each layer's scores are standardised robustly, ``z = (s - median) / MAD`` (``robust="mad"``) or
``z = (s - mean) / std`` (``robust="std"``), and a weight is kept when ``z >= α``, i.e. when its
score is at least ``median + α·MAD``. One ``α`` is searched by bisection so the realised sparsity
hits the target within ``tol``:

* ``mode="global"``: one ``α`` shared by all layers (the budget is spread by how outlying each
  weight is within its own layer, so layers on different scales are comparable);
* ``mode="layerwise"``: one ``α`` per layer, each layer at the target sparsity.

``min_keep_row`` / ``min_keep_col`` always keep the best few weights of every output row / input
column (columns of the ``[out, in*kh*kw]`` view), so no channel is cut off. When the target
cannot be met within ``tol`` (those guarantees keep too much, ties make the threshold jump, or a
layer is too small for the tolerance) the exact-count percentile fallback is used instead and a
``UserWarning`` names the constraint.

Masks are nested: both the threshold and the fallback keep a prefix of the same order (``z``
descending, ties to the lowest index) plus the same guaranteed weights, and a higher sparsity
only shortens the prefix.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping
from typing import Literal

import torch

from knsparse.core.checks import check_number, check_tensor

Mode = Literal["global", "layerwise"]
Robust = Literal["mad", "std"]
_BISECTION_STEPS = 200


def _rows(s: torch.Tensor) -> torch.Tensor:
    return s.reshape(s.shape[0], -1) if s.dim() > 1 else s.reshape(1, -1)


def _standardise(s: torch.Tensor, robust: Robust) -> torch.Tensor:
    """``(s - center) / spread`` as flat float32; a zero spread falls back to the mean absolute
    deviation, then to 1 (a constant layer: every ``z`` is 0)."""
    flat = s.detach().float().flatten()
    if robust == "mad":
        center = flat.median()
        spread = (flat - center).abs().median()
    else:
        center = flat.mean()
        spread = flat.std(unbiased=False) if flat.numel() > 1 else torch.zeros(())
    if not spread > 0:
        spread = (flat - center).abs().mean()
    if not spread > 0:
        spread = torch.ones(())
    return (flat - center) / spread


def _top_per_line(s2d: torch.Tensor, k: int, dim: int) -> torch.Tensor:
    """Bool mask of the ``k`` best entries of every row (``dim=1``) or column (``dim=0``)."""
    out = torch.zeros_like(s2d, dtype=torch.bool)
    k = min(k, s2d.shape[dim])
    if k > 0:
        idx = torch.sort(s2d, dim=dim, descending=True, stable=True).indices.narrow(dim, 0, k)
        out.scatter_(dim, idx, True)
    return out


class _Layer:
    """One layer's standardised scores, guaranteed keeps and the sorted free ``z`` values."""

    def __init__(self, name: str, s: torch.Tensor, robust: Robust, min_keep_row: int, min_keep_col: int):
        if bool(torch.isnan(s).any()):
            raise ValueError(f"layer {name!r}: scores contain NaN; cannot threshold them")
        self.name, self.shape, self.device = name, s.shape, s.device
        s2d = _rows(s.detach().float().cpu())
        self.by_row = _top_per_line(s2d, min_keep_row, 1).flatten()
        self.by_col = _top_per_line(s2d, min_keep_col, 0).flatten()
        self.forced = self.by_row | self.by_col
        self.z = _standardise(s2d, robust)
        self.free_sorted = torch.sort(self.z[~self.forced]).values
        self.numel = self.z.numel()

    def pruned_below(self, alpha: torch.Tensor) -> int:
        """How many free weights have ``z < alpha``."""
        return int(torch.searchsorted(self.free_sorted, alpha, side="left"))

    def threshold_mask(self, alpha: torch.Tensor) -> torch.Tensor:
        return self._shaped((self.z >= alpha) | self.forced)

    def percentile_mask(self, n_prune: int) -> torch.Tensor:
        """Prune exactly the ``n_prune`` free weights lowest in (z ascending, index) order."""
        free_idx = (~self.forced).nonzero().flatten()
        order = torch.sort(self.z[free_idx], stable=True).indices
        keep = torch.ones(self.numel, dtype=torch.bool)
        keep[free_idx[order[:n_prune]]] = False
        return self._shaped(keep)

    def _shaped(self, flat: torch.Tensor) -> torch.Tensor:
        return flat.reshape(self.shape).to(self.device)


def _bisect(layers: list[_Layer], n_target: int) -> torch.Tensor:
    """Smallest float32 ``α`` (to adjacent floats) with ``Σ pruned_below(α) >= n_target``."""
    lo = min(float(layer.free_sorted[0]) for layer in layers if layer.free_sorted.numel())
    hi = max(float(layer.free_sorted[-1]) for layer in layers if layer.free_sorted.numel())
    lo, hi = (
        torch.tensor(lo, dtype=torch.float32),
        torch.nextafter(torch.tensor(hi, dtype=torch.float32), torch.tensor(math.inf)),
    )
    for _ in range(_BISECTION_STEPS):
        mid = ((lo.double() + hi.double()) / 2).float()
        if mid <= lo or mid >= hi:
            break
        if sum(layer.pruned_below(mid) for layer in layers) >= n_target:
            hi = mid
        else:
            lo = mid
    return hi


def _solve(layers: list[_Layer], sparsity: float, tol: float, scope: str) -> dict[str, torch.Tensor]:
    """Masks for ``layers`` sharing one ``α`` at ``sparsity``; ``scope`` names them in warnings."""
    total = sum(layer.numel for layer in layers)
    n_free = sum(layer.free_sorted.numel() for layer in layers)
    n_target = round(sparsity * total)
    if n_target == 0:
        return {layer.name: layer.threshold_mask(torch.tensor(-math.inf)) for layer in layers}
    if n_target > n_free:
        forced_row = sum(int(layer.by_row.sum()) for layer in layers)
        forced_col = sum(int(layer.by_col.sum()) for layer in layers)
        warnings.warn(
            f"mort: sparsity {sparsity:.4f} is infeasible for {scope}: min_keep_row keeps {forced_row} and "
            f"min_keep_col keeps {forced_col} of {total} weights, so at most {n_free / total:.4f} can be "
            "pruned; percentile fallback prunes every other weight",
            UserWarning,
            stacklevel=3,
        )
        return {layer.name: layer.percentile_mask(layer.free_sorted.numel()) for layer in layers}
    alpha = _bisect(layers, n_target)
    pruned = [layer.pruned_below(alpha) for layer in layers]
    realised = sum(pruned) / total
    if abs(realised - sparsity) <= tol:
        return {layer.name: layer.threshold_mask(alpha) for layer in layers}
    below = sum(layer.pruned_below(torch.nextafter(alpha, torch.tensor(-math.inf))) for layer in layers)
    reason = (
        f"tied scores make the threshold jump from {below / total:.4f} to {realised:.4f}"
        if sum(pruned) - below > 1
        else f"only {total} weights, sparsity moves in steps of {1 / total:.4g}"
    )
    warnings.warn(
        f"mort: cannot reach sparsity {sparsity:.4f} ± {tol} by thresholding {scope} ({reason}); "
        "percentile fallback",
        UserWarning,
        stacklevel=3,
    )
    # Split the exact count over layers in the shared (z, layer, index) order.
    keys = torch.cat([layer.free_sorted for layer in layers])
    owner = torch.cat([torch.full((layer.free_sorted.numel(),), i) for i, layer in enumerate(layers)])
    chosen = owner[torch.sort(keys, stable=True).indices[:n_target]]
    counts = torch.bincount(chosen, minlength=len(layers))
    return {layer.name: layer.percentile_mask(int(c)) for layer, c in zip(layers, counts, strict=True)}


def mort(
    scores: Mapping[str, torch.Tensor],
    sparsity: float,
    mode: Mode = "global",
    robust: Robust = "mad",
    min_keep_row: int = 1,
    min_keep_col: int = 0,
    tol: float = 1e-3,
) -> dict[str, torch.Tensor]:
    """Bool keep-masks ``{name: mask}`` (score-shaped) pruning a ``sparsity`` fraction of weights.

    Args:
        scores: ``{layer name: scores}``, higher = more important (e.g. :func:`knsparse.pruning.score.yopo`).
        sparsity: target fraction pruned, in ``[0, 1)``; over all weights (``"global"``) or in
            every layer (``"layerwise"``).
        mode: ``"global"`` (one ``α``) or ``"layerwise"`` (one ``α`` per layer).
        robust: ``"mad"`` (median / median absolute deviation) or ``"std"`` (mean / std).
        min_keep_row: best weights always kept in every output row.
        min_keep_col: best weights always kept in every input column.
        tol: allowed ``|realised - target|`` sparsity (1e-3 = 0.1 percentage point).
    """
    check_number(sparsity, "sparsity", low=0.0, high=1.0, high_open=True)
    check_number(min_keep_row, "min_keep_row", low=0, integer=True)
    check_number(min_keep_col, "min_keep_col", low=0, integer=True)
    check_number(tol, "tol", low=0.0, low_open=True)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{layer name: tensor}}, got {type(scores).__name__}")
    for name, s in scores.items():
        check_tensor(s, f"scores[{name!r}]", floating=False)
    if mode not in ("global", "layerwise"):
        raise ValueError(f"mode must be 'global' or 'layerwise', got {mode!r}")
    if robust not in ("mad", "std"):
        raise ValueError(f"robust must be 'mad' or 'std', got {robust!r}")
    if min_keep_row < 0 or min_keep_col < 0:
        raise ValueError(f"min_keep_row and min_keep_col must be >= 0, got {min_keep_row}, {min_keep_col}")
    if not tol > 0:
        raise ValueError(f"tol must be positive, got {tol}")
    if not scores:
        return {}
    layers = [_Layer(name, s, robust, min_keep_row, min_keep_col) for name, s in scores.items()]
    if mode == "global":
        return _solve(layers, sparsity, tol, "all layers together")
    masks: dict[str, torch.Tensor] = {}
    for layer in layers:
        masks.update(_solve([layer], sparsity, tol, f"layer {layer.name!r}"))
    return masks
