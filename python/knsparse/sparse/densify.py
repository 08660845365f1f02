"""The dense twin of a swapped model: every SparseLinear/SparseConv2d back to Linear/Conv2d."""

from __future__ import annotations

import copy

from torch import nn

from .fuse import restore_activation
from .modules import SparseLinear, set_submodule, sparse_layers


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose sparse layers are plain layers holding the masked dense
    weight (exact zeros at the pruned entries), with any fused activation back in its MLP's
    ``act``; ``model`` itself is untouched."""
    copied = copy.deepcopy(model)
    for name, layer in sparse_layers(copied).items():
        set_submodule(copied, name, layer.to_dense())
        if isinstance(layer, SparseLinear) and layer.activation != "none":
            restore_activation(copied, name, layer.activation)
    return copied
