"""Shared launch helpers for the Triton kernels."""

from __future__ import annotations

import torch
from torch._C._functorch import is_functorch_wrapped_tensor
from torch.utils._python_dispatch import _get_current_dispatch_mode
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


def eager(*tensors: torch.Tensor) -> bool:
    """True for a plain eager call: no ``torch.compile`` / ``torch.export`` tracing, no dispatch or
    torch-function mode, only ordinary tensors (no fake, functional or functorch-wrapped ones).

    The public op wrappers then call the kernel directly and use their ``torch.library`` custom op
    only when a graph is being captured: torch wraps every custom-op kernel in
    ``torch._dynamo.disable``, whose first call imports ``torch._dynamo`` (about 1-2 s on a 2-core
    CPU), a fixed cost a single eager call would otherwise pay.
    """
    return (
        not torch.compiler.is_compiling()
        and _get_current_dispatch_mode() is None
        and not torch._C._is_torch_function_mode_enabled()
        and all(type(t) is torch.Tensor and not is_functorch_wrapped_tensor(t) for t in tensors)
    )
