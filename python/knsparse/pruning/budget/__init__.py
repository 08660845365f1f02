"""How many weights to keep, and where: exact-budget thresholds (MORT), effective numbers (EMP)
and Marchenko–Pastur-guided per-layer sparsities."""

from .emp import emp_global_masks, emp_keep, emp_mask, emp_mass_bound, emp_row_masks
from .mort import mort
from .mp_alloc import mp_layer_sparsities

__all__ = [
    "emp_global_masks",
    "emp_keep",
    "emp_mask",
    "emp_mass_bound",
    "emp_row_masks",
    "mort",
    "mp_layer_sparsities",
]
