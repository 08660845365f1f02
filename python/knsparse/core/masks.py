"""k:n and unstructured masks.

Layout convention: a Linear weight ``[out, in]`` is grouped along ``in``. A Conv2d weight
``[Cout, Cin, R, S]`` is grouped in the pattern's conv order (:mod:`knsparse.core.pattern`):
by default (R, S, C) — ``n`` consecutive *input channels* at each kernel position, the TensorRT
rule — or along ``weight.flatten(1)`` for ``"k:n/crs"``. Both are expressed through the
*reduction view*: a 2-D ``[rows, K]`` matrix whose columns run along the GEMM reduction axis in
that order. The public functions here take ``conv_order=`` too, for callers that hold the order
apart from the pattern; it must agree with the pattern's.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
from torch import nn

from .checks import check_module, check_number, check_tensor
from .pattern import ConvOrder, Pattern, check_conv_order


def _label(name: str | None) -> str:
    return f"layer {name!r}" if name else "tensor"


def check_finite(t: torch.Tensor, label: str) -> None:
    """``ValueError`` "``label``: weight of shape ... contains NaN or Inf" unless every entry of a
    floating-point ``t`` is finite: the one finite-weight check of the package."""
    if not t.is_floating_point():
        return
    # A finite sum proves every entry finite (NaN and Inf propagate); only an overflowing or
    # non-finite sum needs the entry-wise check. numpy sums a CPU float32 / float64 tensor several
    # times faster than torch, and on the calling thread only.
    t = t.detach()
    if t.device.type == "cpu" and t.dtype in (torch.float32, torch.float64):
        total = float(t.numpy().sum())
    else:
        total = float(t.sum())
    if math.isfinite(total) or bool(torch.isfinite(t).all()):
        return
    bad = "NaN" if bool(torch.isnan(t).any()) else "Inf"
    raise ValueError(f"{label}: weight of shape {tuple(t.shape)} contains NaN or Inf (found {bad})")


def to_reduction_view(t: torch.Tensor, conv_order: ConvOrder = "rsc") -> torch.Tensor:
    """``[out, in]`` stays; ``[Cout, Cin, R, S]`` becomes ``[Cout, R*S*Cin]`` (rsc) or
    ``[Cout, Cin*R*S]`` (crs)."""
    if t.dim() == 2:
        return t
    if t.dim() == 4:
        if conv_order == "rsc":
            return t.permute(0, 2, 3, 1).reshape(t.shape[0], -1)
        check_conv_order(conv_order)
        return t.reshape(t.shape[0], -1)
    raise ValueError(f"expected a 2-D Linear or 4-D Conv2d weight, got shape {tuple(t.shape)}")


def from_reduction_view(
    t2d: torch.Tensor, shape: torch.Size | tuple[int, ...], conv_order: ConvOrder = "rsc"
) -> torch.Tensor:
    """Inverse of :func:`to_reduction_view` for a weight of ``shape``."""
    if len(shape) == 2:
        return t2d.reshape(shape)
    cout, cin, r, s = shape
    if conv_order == "rsc":
        return t2d.reshape(cout, r, s, cin).permute(0, 3, 1, 2).contiguous()
    return t2d.reshape(shape)


def check_groupable(shape: torch.Size | tuple[int, ...], pattern: Pattern, name: str | None = None) -> None:
    """Raise ``ValueError`` naming the shape if ``pattern`` cannot tile the reduction axis (in
    the pattern's conv order)."""
    if len(shape) == 4 and pattern.conv_order == "rsc":
        cin = shape[1]
        if cin % pattern.n:
            raise ValueError(
                f"{_label(name)}: conv weight of shape {tuple(shape)} has {cin} input channels, "
                f"not a multiple of n={pattern.n}, so pattern {pattern} cannot group input "
                "channels at each kernel position (R,S,C order)"
            )
        return
    if len(shape) not in (2, 4):
        raise ValueError(
            f"{_label(name)}: expected a 2-D Linear or 4-D Conv2d weight, got shape {tuple(shape)}"
        )
    red = 1
    for d in shape[1:]:
        red *= d
    if red % pattern.n:
        raise ValueError(
            f"{_label(name)}: weight of shape {tuple(shape)} has reduction size {red}, "
            f"not a multiple of n={pattern.n} for pattern {pattern}"
        )


def _grouped(t: torch.Tensor, pattern: Pattern, name: str | None) -> torch.Tensor:
    check_groupable(t.shape, pattern, name)
    return _groups(t, pattern)


def _groups(t: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """``[rows, K / n, n]``: ``t``'s reduction view cut into groups (a groupable shape)."""
    view = to_reduction_view(t, pattern.conv_order)
    return view.reshape(view.shape[0], -1, pattern.n)


def nm_mask(
    scores: torch.Tensor,
    pattern: str | Pattern,
    conv_order: ConvOrder | None = None,
    name: str | None = None,
) -> torch.Tensor:
    """Keep the ``k`` highest scores in every group of ``n`` along the reduction axis.

    Args:
        scores: ``[out, in]`` or ``[Cout, Cin, R, S]``; higher means more important.
        pattern: a k:n pattern (``"2:4"``, ``"8:16"``, ``"2:4/crs"``, ...).
        conv_order: grouping of conv weights, ``"rsc"`` (TensorRT, the default) or ``"crs"``,
            for a pattern given without one.
        name: layer name for error messages.

    Returns:
        A bool mask of ``scores.shape``. Ties are broken towards the lowest index.
    """
    check_tensor(scores, "scores", floating=False, dims=(2, 4))
    if name is not None and not isinstance(name, str):
        raise TypeError(f"name must be a str (the layer name) or None, got {type(name).__name__}")
    pattern = Pattern.parse(pattern, conv_order)
    if torch.isnan(scores).any():
        raise ValueError(f"{_label(name)}: scores contain NaN; cannot rank them")
    groups = _grouped(scores, pattern, name)
    # A stable descending sort keeps equal scores in index order: lowest index wins ties.
    order = torch.sort(groups, dim=-1, descending=True, stable=True).indices
    mask = torch.zeros(groups.shape, dtype=torch.bool, device=scores.device)
    mask.scatter_(-1, order[..., : pattern.k], True)
    return from_reduction_view(mask.reshape(groups.shape[0], -1), scores.shape, pattern.conv_order)


def group_nonzeros(
    t: torch.Tensor, pattern: str | Pattern, conv_order: ConvOrder | None = None
) -> torch.Tensor:
    """Number of nonzero (or True) entries in every group: ``[rows, K / n]`` int64."""
    check_tensor(t, "t", floating=False)
    return (_grouped(t, Pattern.parse(pattern, conv_order), None) != 0).sum(-1)


def nm_violation(mask: torch.Tensor, pattern: Pattern) -> str | None:
    """Why a bool ``mask`` of a groupable shape is not ``pattern`` (groups keeping more than
    ``k``), or ``None`` when it is: the one "is this k:n" check of the package, for masks and
    for dense weights alike (their zeros)."""
    over = (_groups(mask, pattern) != 0).sum(-1) > pattern.k
    if over.any():
        return f"mask is not {pattern}: {int(over.sum())} of {over.numel()} groups keep more than {pattern.k}"
    return None


def is_nm(t: torch.Tensor, pattern: str | Pattern, conv_order: ConvOrder | None = None) -> bool:
    """True if every group of ``n`` holds at most ``k`` nonzeros (a bool mask: at most ``k`` True).

    A shape the pattern cannot tile is not k:n and gives False.
    """
    check_tensor(t, "t", floating=False)
    pattern = Pattern.parse(pattern, conv_order)
    try:
        check_groupable(t.shape, pattern)
    except ValueError:
        return False
    return nm_violation(t, pattern) is None


def _check_sparsity(sparsity: float, min_keep_row: int) -> None:
    check_number(sparsity, "sparsity", low=0.0, high=1.0, high_open=True)
    check_number(min_keep_row, "min_keep_row", low=0, integer=True)


def _keep_top(flat: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Bool mask keeping exactly ``n_keep`` largest entries of a 1-D tensor (lowest index on ties)."""
    mask = torch.zeros_like(flat, dtype=torch.bool)
    if n_keep > 0:
        order = torch.sort(flat, descending=True, stable=True).indices
        mask[order[:n_keep]] = True
    return mask


def _ensure_min_keep_row(mask: torch.Tensor, scores: torch.Tensor, min_keep_row: int) -> torch.Tensor:
    if min_keep_row <= 0:
        return mask
    rows = scores.reshape(scores.shape[0], -1)
    m = mask.reshape(rows.shape).clone()
    k = min(min_keep_row, rows.shape[1])
    top = torch.sort(rows, dim=1, descending=True, stable=True).indices[:, :k]
    m.scatter_(1, top, True)
    return m.reshape(mask.shape)


def unstructured_mask(scores: torch.Tensor, sparsity: float, min_keep_row: int = 1) -> torch.Tensor:
    """Per-layer unstructured mask: drop the ``sparsity`` fraction with the lowest scores.

    Exactly ``round(sparsity * numel)`` entries are dropped, then each output row is topped
    up to ``min_keep_row`` kept entries (its best ones), which can only lower the sparsity.
    """
    _check_sparsity(sparsity, min_keep_row)
    check_tensor(scores, "scores", floating=False)
    if torch.isnan(scores).any():
        raise ValueError("scores contain NaN; cannot rank them")
    n_keep = scores.numel() - round(sparsity * scores.numel())
    mask = _keep_top(scores.reshape(-1), n_keep).reshape(scores.shape)
    return _ensure_min_keep_row(mask, scores, min_keep_row)


def global_unstructured_masks(
    scores: Mapping[str, torch.Tensor], sparsity: float, min_keep_row: int = 1
) -> dict[str, torch.Tensor]:
    """One threshold across all layers: drop the globally lowest ``sparsity`` fraction.

    Scores must be comparable across layers (e.g. magnitudes). Rows are topped up to
    ``min_keep_row`` kept entries so no output channel is cut off entirely.
    """
    _check_sparsity(sparsity, min_keep_row)
    if not isinstance(scores, Mapping):
        raise TypeError(f"scores must be a mapping {{layer name: tensor}}, got {type(scores).__name__}")
    for name, t in scores.items():
        if not isinstance(name, str):
            raise TypeError(f"scores keys must be layer names (str), got {name!r}")
        check_tensor(t, f"scores[{name!r}]", floating=False)
    names = list(scores)
    if not names:
        return {}
    flat = torch.cat([scores[n].detach().reshape(-1).float().cpu() for n in names])
    if torch.isnan(flat).any():
        bad = next(n for n in names if torch.isnan(scores[n]).any())
        raise ValueError(f"layer {bad!r}: scores contain NaN; cannot rank them")
    keep = _keep_top(flat, flat.numel() - round(sparsity * flat.numel()))
    out: dict[str, torch.Tensor] = {}
    offset = 0
    for n in names:
        s = scores[n]
        m = keep[offset : offset + s.numel()].reshape(s.shape).to(s.device)
        offset += s.numel()
        out[n] = _ensure_min_keep_row(m, s, min_keep_row)
    return out


def sparsity_of(mask: torch.Tensor) -> float:
    """Fraction of False (pruned) entries."""
    return 1.0 - mask.float().mean().item()


def bool_masks(masks: object) -> dict[str, torch.Tensor]:
    """``masks`` as ``{layer name: bool mask}`` (0/1 masks converted); ``TypeError``/``ValueError``
    naming the layer for anything else."""
    if not isinstance(masks, Mapping):
        raise TypeError(f"masks must be a {{layer name: bool mask}} mapping, got {type(masks).__name__}")
    out = {}
    for name, mask in masks.items():
        if not isinstance(name, str):
            raise TypeError(f"mask keys must be layer names (str), got {name!r}")
        if not isinstance(mask, torch.Tensor):
            raise TypeError(f"layer {name!r}: mask must be a torch.Tensor, got {type(mask).__name__}")
        if mask.dtype != torch.bool:
            if mask.is_complex() or not bool(((mask == 0) | (mask == 1)).all()):
                raise ValueError(
                    f"layer {name!r}: mask must be bool (or 0/1), got other values in a {mask.dtype} tensor"
                )
            mask = mask.bool()
        out[name] = mask
    return out


def apply_masks(model: nn.Module, masks: Mapping[str, torch.Tensor]) -> None:
    """Zero the pruned weights in place: ``masks`` maps module names to bool masks of their weight.

    Every name and shape is checked before any weight changes (``ValueError`` naming the layer)."""
    check_module(model, meta="refuse")
    masks = bool_masks(masks)
    modules = dict(model.named_modules())
    for name, mask in masks.items():
        if name not in modules or not isinstance(getattr(modules[name], "weight", None), torch.Tensor):
            raise ValueError(f"mask given for {name!r}, which is not a module with a weight")
        weight = modules[name].weight
        if not isinstance(mask, torch.Tensor) or mask.shape != weight.shape:
            shape = tuple(mask.shape) if isinstance(mask, torch.Tensor) else type(mask).__name__
            raise ValueError(f"layer {name!r}: mask shape {shape} != weight shape {tuple(weight.shape)}")
    with torch.no_grad():
        for name, mask in masks.items():
            weight = modules[name].weight
            weight.mul_(mask.to(weight.device, weight.dtype))
