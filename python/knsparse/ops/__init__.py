"""knsparse's ops: the native CUDA kernels as torch custom ops, their fake implementations,
their plain-PyTorch ``*_ref`` twins, and the metadata conversion they need.

* :mod:`.native`: the ctypes binding of ``libknsparse_cuda.so`` (C ABI, no libtorch).
* :mod:`.device`: whether the kernels can run here, and why not.
* :mod:`.gemm`: ``knsparse::sparse_gemm`` / :func:`sparse_gemm` / :func:`sparse_gemm_ref`.
* :mod:`.im2col`: ``knsparse::im2col_rsc`` / :func:`im2col_rsc` / :func:`im2col_rsc_ref`.
* :mod:`.meta`: the Ampere and Hopper CUTLASS metadata layouts.
* :mod:`.interop`: every function here also takes CuPy / JAX / Numba / NumPy arrays (DLPack or
  the CUDA array interface), viewed without a copy; results are torch tensors.

Layering: ops builds on pattern, masks and pack; ``knsparse.backends`` builds on ops.
"""

from .device import available, unavailable_reason
from .gemm import ACTIVATIONS, activate, dense_weight, sparse_gemm, sparse_gemm_ref
from .im2col import conv2d_via_im2col_ref, conv_output_size, im2col_rsc, im2col_rsc_ref, rows_to_nchw
from .meta import meta_arch, prepare_meta, round_up

__all__ = [
    "ACTIVATIONS",
    "activate",
    "available",
    "conv2d_via_im2col_ref",
    "conv_output_size",
    "dense_weight",
    "im2col_rsc",
    "im2col_rsc_ref",
    "meta_arch",
    "prepare_meta",
    "round_up",
    "rows_to_nchw",
    "sparse_gemm",
    "sparse_gemm_ref",
    "unavailable_reason",
]
