"""PyTorch's semi-structured 2:4 backends: cuSPARSELt and CUTLASS (CUDA only).

CUTLASS's path in PyTorch runs on compute capability 8.x only; on Hopper only cuSPARSELt
works. Both need fp16/bf16 2:4 weights whose shape meets the backend's multiples.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.pack import check_24
from ..core.pattern import Pattern
from .base import Backend, BackendUnavailableError, ConvSpec, LinearSpec, activate


class TorchSemiStructuredBackend(Backend):
    def __init__(self, name: str, min_rows: int, min_cols: int) -> None:
        self.name = name
        self.min_rows = min_rows
        self.min_cols = min_cols

    def _tensor_class(self) -> type:
        from torch.sparse import semi_structured as ss

        if self.name == "torch-cutlass":
            return ss.SparseSemiStructuredTensorCUTLASS
        return ss.SparseSemiStructuredTensorCUSPARSELT

    def unavailable_reason(self) -> str | None:
        if not torch.cuda.is_available():
            return "needs a CUDA device (none visible)"
        if self.name == "torch-cutlass":
            major, minor = torch.cuda.get_device_capability()
            if major != 8:
                return (
                    "PyTorch's CUTLASS 2:4 kernels run on compute capability 8.x only, "
                    f"this GPU is {major}.{minor}"
                )
        elif not torch.backends.cusparselt.is_available():
            return "this PyTorch build has no cuSPARSELt"
        return None

    def linear_unsupported_reason(self, spec: LinearSpec) -> str | None:
        if not spec.pattern.is_24:
            return f"pattern {spec.pattern}: sparse tensor cores execute 2:4 only"
        if spec.dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {spec.dtype}: {self.name} runs float16/bfloat16 here"
        if spec.device.type != "cuda":
            return f"weight on {spec.device}, not CUDA"
        if spec.out_features % self.min_rows or spec.in_features % self.min_cols:
            return (
                f"shape ({spec.out_features}, {spec.in_features}) off the {self.name} multiples "
                f"(rows % {self.min_rows}, cols % {self.min_cols})"
            )
        return None

    def prepare_linear(self, dense_weight: torch.Tensor) -> torch.Tensor:
        return self._tensor_class().from_dense(dense_weight.contiguous())

    def linear(
        self, x2d: torch.Tensor, operand: object, bias: torch.Tensor | None, activation: str = "none"
    ) -> torch.Tensor:
        return activate(F.linear(x2d, operand, bias), activation)  # torch's kernels fuse no activation

    def _no_conv(self) -> str:
        return f"{self.name} has no convolution lowering (the im2col path is knsparse-cuda's)"

    def conv_unsupported_reason(self, spec: ConvSpec) -> str | None:
        return self._no_conv()

    def prepare_conv(self, dense_weight: torch.Tensor) -> object:
        raise BackendUnavailableError(self._no_conv())

    def conv2d(
        self, x: torch.Tensor, operand: object, bias: torch.Tensor | None, spec: ConvSpec
    ) -> torch.Tensor:
        raise BackendUnavailableError(self._no_conv())


CUSPARSELT = TorchSemiStructuredBackend("torch-cusparselt", 16, 16)
CUTLASS = TorchSemiStructuredBackend("torch-cutlass", 32, 64)


def to_semi_structured(w: torch.Tensor, backend: str = "auto") -> torch.Tensor:
    """PyTorch's ``SparseSemiStructuredTensor`` of a 2:4 CUDA weight ``[m, k]`` (fp16/bf16).

    ``backend``: ``"cusparselt"``, ``"cutlass"`` (compute capability 8.x only) or ``"auto"``
    (cuSPARSELt where available, else CUTLASS). The weight is validated as for
    :func:`knsparse.core.pack.pack_24` first, so a broken or non-2:4 weight is refused, never
    silently re-pruned.
    """
    check_24(w)
    impls = {"cusparselt": (CUSPARSELT,), "cutlass": (CUTLASS,), "auto": (CUSPARSELT, CUTLASS)}
    if backend not in impls:
        raise ValueError(f"backend must be 'cusparselt', 'cutlass' or 'auto', got {backend!r}")
    reasons = []
    for impl in impls[backend]:
        spec = LinearSpec(w.shape[0], w.shape[1], w.dtype, Pattern(2, 4), w.device)
        reason = impl.unavailable_reason() or impl.linear_unsupported_reason(spec)
        if reason is None:
            return impl.prepare_linear(w)
        reasons.append(f"{impl.name}: {reason}")
    raise BackendUnavailableError("no semi-structured backend can take this weight: " + "; ".join(reasons))
