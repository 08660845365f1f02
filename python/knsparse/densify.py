"""The dense twin of a swapped model: every SparseLinear/SparseConv2d back to Linear/Conv2d."""

from __future__ import annotations

import copy

from torch import nn

from .modules import sparse_layers


def dense_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` whose sparse layers are plain layers holding the masked dense
    weight (exact zeros at the pruned entries); ``model`` itself is untouched."""
    copied = copy.deepcopy(model)
    for name, layer in sparse_layers(copied).items():
        parent_name, _, child = name.rpartition(".")
        setattr(copied.get_submodule(parent_name) if parent_name else copied, child, layer.to_dense())
    return copied
