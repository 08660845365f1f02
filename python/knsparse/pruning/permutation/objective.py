"""The permutation objective: how much score survives k:n masking after a column permutation.

A weight is seen through its *search matrix* ``[rows, channels]``: the nonnegative scores
(``|w|``) with one column per input channel. For a Linear weight ``[out, in]`` that is ``|w|``
itself. For a Conv2d weight ``[Cout, Cin, R, S]`` grouped in (R, S, C) order every kernel
position is a row: ``[Cout * R * S, Cin]``, so one channel permutation moves the same
column in every row, exactly as permuting the producer's output channels would. Weights that
must share one input permutation are stacked along the rows.

Permuting the columns by ``perm`` (new column ``j`` holds old column ``perm[j]``) and keeping
the ``k`` largest scores in every group of ``n`` consecutive columns gives the *kept score*.
The efficacy follows apex ASP: ``(base_lost - cur_lost) / (base_lost - optimal_lost)`` where
the optimum keeps the same number of entries per row without any group constraint.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from ...core.masks import check_groupable
from ...core.pattern import ConvOrder, Pattern


def _top2_of_4(x: torch.Tensor, dim: int) -> torch.Tensor:
    # A min/max network: several times faster than topk on the 2:4 hot path.
    x0, x1, x2, x3 = x.unbind(dim)
    hi01, lo01 = torch.maximum(x0, x1), torch.minimum(x0, x1)
    hi23, lo23 = torch.maximum(x2, x3), torch.minimum(x2, x3)
    second = torch.maximum(torch.minimum(hi01, hi23), torch.maximum(lo01, lo23))
    return torch.maximum(hi01, hi23) + second


def kept_and_kth_pair(x: torch.Tensor, k: int, dim: int = -1) -> tuple[torch.Tensor, ...]:
    """Sum of the ``k`` largest entries along ``dim`` (as :func:`topk_sum`) and the ``k``-th and
    ``(k+1)``-th largest entries, in one pass; ``dim`` is removed, ``k < n``."""
    if (k, x.shape[dim]) == (2, 4):
        x0, x1, x2, x3 = x.unbind(dim)
        hi01, lo01 = torch.maximum(x0, x1), torch.minimum(x0, x1)
        hi23, lo23 = torch.maximum(x2, x3), torch.minimum(x2, x3)
        inner_hi, inner_lo = torch.minimum(hi01, hi23), torch.maximum(lo01, lo23)
        kth = torch.maximum(inner_hi, inner_lo)
        return torch.maximum(hi01, hi23) + kth, kth, torch.minimum(inner_hi, inner_lo)
    top = x.topk(k + 1, dim=dim).values
    return top.narrow(dim, 0, k).sum(dim), top.select(dim, k - 1), top.select(dim, k)


def topk_sum(x: torch.Tensor, k: int, dim: int = -1) -> torch.Tensor:
    """Sum of the ``k`` largest entries along ``dim`` (which is removed)."""
    n = x.shape[dim]
    if (k, n) == (2, 4):
        return _top2_of_4(x, dim)
    if k == n:
        return x.sum(dim)
    if 2 * k <= n:
        return x.topk(k, dim=dim, sorted=False).values.sum(dim)
    # Fewer entries to drop than to keep: subtract the n - k smallest.
    return x.sum(dim) - (-x).topk(n - k, dim=dim, sorted=False).values.neg().sum(dim)


def search_matrix(
    weight: torch.Tensor, conv_order: ConvOrder = "rsc", name: str | None = None
) -> torch.Tensor:
    """``|weight|`` as a float32 ``[rows, input channels]`` matrix (see the module docstring).

    A 1x1 convolution is accepted in either conv order; a larger kernel only in (R, S, C)
    order, since with (C, R, S) grouping a channel permutation moves whole ``R*S`` blocks
    across group boundaries and is not a column permutation of the groups.
    """
    label = f"layer {name!r}" if name else "weight"
    if weight.dim() == 2:
        return weight.detach().abs().float()
    if weight.dim() == 4:
        cout, cin, r, s = weight.shape
        if conv_order != "rsc" and r * s > 1:
            raise ValueError(
                f"{label}: channel permutation of a {r}x{s} conv weight {tuple(weight.shape)} needs "
                f"conv_order='rsc' (groups of input channels at each kernel position), got {conv_order!r}"
            )
        return weight.detach().abs().float().permute(0, 2, 3, 1).reshape(cout * r * s, cin)
    raise ValueError(f"{label}: expected a 2-D Linear or 4-D Conv2d weight, got shape {tuple(weight.shape)}")


def stacked_search_matrix(
    weights: torch.Tensor | Sequence[torch.Tensor], pattern: Pattern, names: Sequence[str] | None = None
) -> torch.Tensor:
    """Search matrices of weights sharing their input channels, stacked along the rows.

    Raises ``ValueError`` naming the layer when the channel counts differ or the pattern
    cannot tile the channels.
    """
    if isinstance(weights, torch.Tensor):
        weights = [weights]
    if not weights:
        raise ValueError("need at least one weight to search a permutation for")
    names = list(names) if names is not None else [None] * len(weights)
    mats = []
    for w, name in zip(weights, names, strict=True):
        check_groupable(w.shape, pattern, name)
        mats.append(search_matrix(w, pattern.conv_order, name))
    channels = {m.shape[1] for m in mats}
    if len(channels) > 1:
        shapes = ", ".join(
            f"{n or i}: {tuple(w.shape)}" for i, (w, n) in enumerate(zip(weights, names, strict=True))
        )
        raise ValueError(f"weights sharing one input permutation have different input channels ({shapes})")
    if mats[0].shape[1] % pattern.n:
        raise ValueError(
            f"{mats[0].shape[1]} input channels are not a multiple of n={pattern.n} for pattern {pattern}"
        )
    device = mats[0].device
    return torch.cat([m.to(device) for m in mats], dim=0)


def kept_score(matrix: torch.Tensor, pattern: Pattern, perm: torch.Tensor | None = None) -> float:
    """Score kept by k:n masking of ``matrix[:, perm]`` (per-group sums in float32, total in float64)."""
    m = matrix if perm is None else matrix[:, perm]
    rows, cols = m.shape
    return topk_sum(m.reshape(rows, cols // pattern.n, pattern.n), pattern.k).double().sum().item()


def optimal_kept(matrix: torch.Tensor, pattern: Pattern) -> float:
    """Upper bound: per row, the ``k/n`` fraction of largest scores without group constraint."""
    keep = matrix.shape[1] * pattern.k // pattern.n
    return topk_sum(matrix, keep).double().sum().item()


def efficacy(kept_before: float, kept_after: float, kept_optimal: float) -> float:
    """apex ASP efficacy ``(base_lost - cur_lost) / (base_lost - optimal_lost)``.

    When no permutation can gain anything (``kept_before`` already optimal) it is 1.0.
    """
    headroom = kept_optimal - kept_before
    if headroom <= 1e-12 * max(abs(kept_optimal), 1.0):
        return 1.0
    return (kept_after - kept_before) / headroom
