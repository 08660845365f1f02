"""knsparse: k:n / 2:4 semi-structured sparse inference for vision models."""

from . import backends, models
from .io import load_sparse, save_sparse
from .masks import global_unstructured_masks, is_nm, nm_mask, unstructured_mask
from .modules import SparseConv2d, SparseLinear, SwapReport, swap_modules
from .pack import Packed24, pack_24, to_semi_structured, unpack_24
from .pattern import Pattern

__all__ = [
    "Packed24",
    "Pattern",
    "SparseConv2d",
    "SparseLinear",
    "SwapReport",
    "backends",
    "global_unstructured_masks",
    "is_nm",
    "load_sparse",
    "models",
    "nm_mask",
    "pack_24",
    "save_sparse",
    "swap_modules",
    "to_semi_structured",
    "unpack_24",
    "unstructured_mask",
]
__version__ = "0.1.0"
