"""knsparse: k:n / 2:4 semi-structured sparse inference for vision models."""

from . import backends, budget, families, permutation, repair, score, spectral, tome
from .audit import audit
from .backends.torch_semi import to_semi_structured
from .export import export_onnx
from .fuse import fuse_activations
from .io import load_sparse, save_sparse
from .macs import macs
from .masks import apply_masks, global_unstructured_masks, is_nm, nm_mask, unstructured_mask
from .modules import SparseConv2d, SparseLinear, SwapReport, swap_modules
from .pack import Packed24, pack_24, unpack_24
from .pattern import Pattern
from .permutation import permute
from .prune import prune

__all__ = [
    "Packed24",
    "Pattern",
    "SparseConv2d",
    "SparseLinear",
    "SwapReport",
    "apply_masks",
    "audit",
    "backends",
    "budget",
    "export_onnx",
    "families",
    "fuse_activations",
    "global_unstructured_masks",
    "is_nm",
    "load_sparse",
    "macs",
    "nm_mask",
    "pack_24",
    "permutation",
    "permute",
    "prune",
    "repair",
    "save_sparse",
    "score",
    "spectral",
    "swap_modules",
    "to_semi_structured",
    "tome",
    "unpack_24",
    "unstructured_mask",
]
__version__ = "0.1.0"
