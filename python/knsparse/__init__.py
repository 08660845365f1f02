"""knsparse: k:n / 2:4 semi-structured sparse inference for vision models.

The public API (``ks.prune``, ``ks.swap_modules``, ...) lives here; the package's layout is
described in ``docs/design.md``: ``core`` and ``utils`` (foundation), ``ops``, ``backends`` and
``kernels`` (the native and Triton kernels), ``pruning``, ``sparse``, ``deploy`` and
``integrations`` (the stages), ``app`` and ``cli`` (the command line and the demo).
"""

from types import ModuleType

from . import _compat, backends
from .backends import register_backend
from .backends.torch_semi import to_semi_structured
from .core.masks import apply_masks, global_unstructured_masks, is_nm, nm_mask, unstructured_mask
from .core.pack import Packed24, pack_24, unpack_24
from .core.pattern import Pattern
from .deploy import tome
from .deploy.audit import audit
from .deploy.export import export_onnx
from .deploy.macs import macs
from .integrations import families
from .integrations.families import register_family
from .pruning import budget, methods, permutation, repair, score, spectral
from .pruning.config import (
    CalibrationConfig,
    DenseTarget,
    DiagnosticsConfig,
    MethodConfig,
    PermuteConfig,
    PruneConfig,
    RepairConfig,
)
from .pruning.finetune import MaskLearning, finetune
from .pruning.methods import register_method
from .pruning.permutation import permute
from .pruning.prune import prune
from .pruning.quantize import QuantizeResult, quantize
from .pruning.sensitivity import layer_sensitivity
from .sparse.fuse import fuse_activations
from .sparse.io import load_sparse, save_sparse
from .sparse.modules import SparseConv2d, SparseLinear, SwapReport, swap_modules
from .utils import distributed

__all__ = [
    "CalibrationConfig",
    "DenseTarget",
    "DiagnosticsConfig",
    "MaskLearning",
    "MethodConfig",
    "Packed24",
    "Pattern",
    "PermuteConfig",
    "PruneConfig",
    "QuantizeResult",
    "RepairConfig",
    "SparseConv2d",
    "SparseLinear",
    "SwapReport",
    "apply_masks",
    "audit",
    "backends",
    "budget",
    "distributed",
    "export_onnx",
    "families",
    "finetune",
    "fuse_activations",
    "global_unstructured_masks",
    "is_nm",
    "layer_sensitivity",
    "load_sparse",
    "macs",
    "methods",
    "nm_mask",
    "pack_24",
    "permutation",
    "permute",
    "prune",
    "quantize",
    "register_backend",
    "register_family",
    "register_method",
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

_compat.install()


def __getattr__(name: str) -> ModuleType:
    """``knsparse.<old module name>`` (``knsparse.masks``): the module at its new path, with a
    ``DeprecationWarning`` (:mod:`knsparse._compat`)."""
    if name in _compat.MOVED:
        return _compat.moved_module(f"knsparse.{name}")
    raise AttributeError(f"module 'knsparse' has no attribute {name!r}")
