"""How many weights to keep, and where: exact-budget thresholds (MORT) and effective numbers (EMP)."""

from .emp import emp_global_masks, emp_keep, emp_mask, emp_mass_bound, emp_row_masks
from .mort import mort

__all__ = ["emp_global_masks", "emp_keep", "emp_mask", "emp_mass_bound", "emp_row_masks", "mort"]
