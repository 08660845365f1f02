"""Which modules of a model are prunable, and their weights as 2-D reduction views.

A prunable layer is an ``nn.Linear`` or an ungrouped ``nn.Conv2d`` (``groups == 1``): those are
the layers a k:n sparse GEMM executes. Grouped and depthwise convolutions have no shared
reduction axis across output channels and are left alone.
"""

from __future__ import annotations

import torch
from torch import nn

from .masks import ConvOrder, to_reduction_view


def is_prunable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for ``nn.Conv2d`` with ``groups == 1``."""
    if isinstance(module, nn.Linear):
        return True
    return isinstance(module, nn.Conv2d) and module.groups == 1


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified module name: module}`` for every prunable layer, in ``named_modules`` order."""
    return {name: m for name, m in model.named_modules() if is_prunable(m)}


def reduction_weight(module: nn.Module, conv_order: ConvOrder = "rsc") -> torch.Tensor:
    """The layer's weight as ``[out, K]``: Linear ``[out, in]``; Conv2d ``[Cout, R*S*Cin]`` (rsc)
    or ``[Cout, Cin*R*S]`` (crs). Detached; a view where the layout allows."""
    return to_reduction_view(module.weight.detach(), conv_order)
