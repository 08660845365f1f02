"""Which modules of a model are prunable, and their weights as 2-D reduction views.

A prunable layer is an ``nn.Linear`` or an ungrouped ``nn.Conv2d`` (``groups == 1``) with zero
padding: those are the layers a k:n sparse GEMM executes. Grouped and depthwise convolutions have
no shared reduction axis across output channels and are left alone. This module is the one place
that rule lives; masking, pruning, swapping and reporting all ask it.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import ConvOrder, check_groupable, to_reduction_view
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


def pattern_layers(
    model: nn.Module, pattern: str | Pattern, conv_order: ConvOrder = "rsc"
) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The prunable layers whose weight shape can carry ``pattern`` (groups along the reduction
    axis in ``conv_order``), and ``{name: why not}`` for every other Linear / Conv2d. Shapes only."""
    pattern = Pattern.parse(pattern)
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    for name, module in model.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        reason = ineligibility(module)
        if reason is None:
            try:
                check_groupable(module.weight.shape, pattern, conv_order, name)
            except ValueError as err:
                reason = str(err)
        if reason:
            skipped[name] = reason
        else:
            layers[name] = module
    return layers, skipped


def reduction_weight(module: nn.Module, conv_order: ConvOrder = "rsc") -> torch.Tensor:
    """The layer's weight as ``[out, K]``: Linear ``[out, in]``; Conv2d ``[Cout, R*S*Cin]`` (rsc)
    or ``[Cout, Cin*R*S]`` (crs). Detached; a view where the layout allows."""
    return to_reduction_view(module.weight.detach(), conv_order)
