"""Which modules of a model are prunable, and their weights as 2-D reduction views.

A prunable layer is an ``nn.Linear`` or an ungrouped ``nn.Conv2d`` (``groups == 1``) with zero
padding: those are the layers a k:n sparse GEMM executes. Grouped and depthwise convolutions have
no shared reduction axis across output channels and are left alone. This module is the one place
that rule lives; masking, pruning, swapping and reporting all ask it.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import ConvOrder, check_groupable, nm_violation, to_reduction_view
from .pattern import Pattern


def ineligibility(module: nn.Module) -> str | None:
    """Why a k:n sparse GEMM cannot execute ``module``, or ``None`` when it can."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Linear or Conv2d layer"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups}) is not eligible for k:n sparse GEMM"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (zeros only)"
    return None


def is_prunable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for zero-padded ``nn.Conv2d`` with ``groups == 1``."""
    return ineligibility(module) is None


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified module name: module}`` for every prunable layer, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if is_prunable(m)}


def shape_ineligibility(
    name: str, module: nn.Module, pattern: Pattern | None, conv_order: ConvOrder = "rsc"
) -> str | None:
    """Why ``module`` cannot carry ``pattern`` (its kind, or a reduction axis the groups cannot
    tile), or ``None``; with ``pattern=None`` (unstructured masks) only its kind counts. Shapes only."""
    reason = ineligibility(module)
    if reason or pattern is None:
        return reason
    try:
        check_groupable(module.weight.shape, pattern, conv_order, name)
    except ValueError as err:
        return str(err)
    return None


def swap_ineligibility(
    name: str, module: nn.Module, mask: torch.Tensor, pattern: Pattern, conv_order: ConvOrder = "rsc"
) -> str | None:
    """Why a sparse module cannot replace ``module`` with ``mask`` (a bool tensor of the weight's
    shape), or ``None``: :func:`shape_ineligibility`, then :func:`mask_ineligibility`."""
    return shape_ineligibility(name, module, pattern, conv_order) or nm_violation(mask, pattern, conv_order)


def pattern_layers(
    model: nn.Module, pattern: Pattern | None, conv_order: ConvOrder = "rsc"
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The prunable layers whose weight shape can carry ``pattern`` (groups along the reduction
    axis in ``conv_order``; any prunable layer for ``None``), and ``{name: why not}`` for every
    other Linear / Conv2d. Shapes only."""
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        reason = shape_ineligibility(name, module, pattern, conv_order)
        if reason:
            skipped[name] = reason
        else:
            layers[name] = module
    return layers, skipped


def reduction_weight(module: nn.Module, conv_order: ConvOrder = "rsc") -> torch.Tensor:
    """The layer's weight as ``[out, K]``: Linear ``[out, in]``; Conv2d ``[Cout, R*S*Cin]`` (rsc)
    or ``[Cout, Cin*R*S]`` (crs). Detached; a view where the layout allows."""
    return to_reduction_view(module.weight.detach(), conv_order)
