"""knsparse: k:n / 2:4 semi-structured sparse inference for vision models."""

from .masks import is_nm, nm_mask
from .pattern import Pattern

__all__ = ["Pattern", "is_nm", "nm_mask"]
__version__ = "0.1.0"
