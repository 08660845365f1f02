"""Shared launch helpers for the Triton kernels."""

from __future__ import annotations

import torch
from triton.runtime.interpreter import InterpretedFunction


def for_device(kernel, t: torch.Tensor):
    """Return ``kernel`` if it can run on ``t``'s device, else raise a ``ValueError`` that says how.

    CUDA tensors run the compiled kernel. CPU tensors need Triton's interpreter, which
    ``TRITON_INTERPRET=1`` selects when it is set before ``triton`` is first imported; the tests
    use it to check every kernel against its reference on small shapes.
    """
    if t.is_cuda or isinstance(kernel, InterpretedFunction):
        return kernel
    raise ValueError(
        f"Triton kernel {kernel.__name__} needs CUDA tensors, got {t.device}; on CPU use the reference, "
        "or set TRITON_INTERPRET=1 before triton is imported to run the kernel in Triton's interpreter"
    )


def next_pow2(n: int) -> int:
    return 1 << max(0, n - 1).bit_length()
