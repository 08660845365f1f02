"""Per-layer sparsity budgets."""

from .mp_alloc import mp_layer_sparsities

__all__ = ["mp_layer_sparsities"]
