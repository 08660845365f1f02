"""knsparse's own CUDA backend: 2:4 sparse GEMM on sparse tensor cores (CUTLASS) and im2col.

A thin registry backend over :mod:`knsparse.ops` (the native library's custom ops): it packs
weights once per layer (``knsparse.core.pack``, zero-padded to the CUTLASS multiples) with metadata
for the device's architecture, lowers convolutions to (R,S,C) im2col + the sparse GEMM, and
says why it cannot run when it cannot. :data:`KNSPARSE_CUDA` is the registry entry.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ..core.masks import to_reduction_view
from ..core.pack import pack_24
from ..ops import gemm
from ..ops.device import unavailable_reason
from ..ops.im2col import conv_output_size, im2col_rsc, rows_to_nchw
from ..ops.meta import prepare_meta
from .base import Backend, ConvSpec, LinearSpec

# --- the registry backend ---------------------------------------------------------------------


@dataclass(frozen=True)
class SparseOperand:
    """A 2:4 weight ready for :func:`knsparse.ops.sparse_gemm` on one device.

    ``values [rows_pad, depth_pad/2]`` and ``meta`` (:func:`knsparse.ops.prepare_meta`) of the weight
    zero-padded by ``knsparse.core.pack.pack_24`` to the CUTLASS multiples; ``rows`` and ``depth``
    are the layer's own sizes.
    """

    values: torch.Tensor
    meta: torch.Tensor
    rows: int
    depth: int


def _padding(spec: ConvSpec) -> tuple[int, int] | str:
    """Explicit symmetric padding of ``spec``, or why there is none."""
    if not isinstance(spec.padding, str):
        return tuple(spec.padding)
    if spec.padding == "valid":
        return (0, 0)
    total = [d * (k - 1) for d, k in zip(spec.dilation, spec.kernel_size, strict=True)]
    if any(t % 2 for t in total):
        return f"padding='same' with kernel {spec.kernel_size} pads asymmetrically; im2col pads symmetrically"
    return (total[0] // 2, total[1] // 2)


class KnsparseCudaBackend(Backend):
    """knsparse's CUTLASS sparse GEMM (fp16/bf16 2:4; Ampere/Ada and Hopper), convolutions as
    (R,S,C) im2col + sparse GEMM, 1x1 stride-1 convolutions straight on channels-last rows."""

    name = "knsparse-cuda"

    def unavailable_reason(self) -> str | None:
        return unavailable_reason()

    def _unsupported(self, pattern, dtype: torch.dtype, device: torch.device) -> str | None:
        if not pattern.is_24:
            return f"pattern {pattern}: sparse tensor cores execute 2:4 only"
        if dtype not in (torch.float16, torch.bfloat16):
            return f"dtype {dtype}: knsparse-cuda runs float16/bfloat16"
        if device.type != "cuda":
            return f"weight on {device}, not CUDA"
        return unavailable_reason(device)

    def linear_unsupported_reason(self, spec: LinearSpec) -> str | None:
        return self._unsupported(spec.pattern, spec.dtype, spec.device)

    def _prepare(self, w2d: torch.Tensor) -> SparseOperand:
        packed = pack_24(w2d.contiguous(), pad=True)
        return SparseOperand(packed.values, prepare_meta(packed.meta), *packed.shape)

    def prepare_linear(self, dense_weight: torch.Tensor) -> SparseOperand:
        return self._prepare(dense_weight)

    def linear(
        self, x2d: torch.Tensor, operand: object, bias: torch.Tensor | None, activation: str = "none"
    ) -> torch.Tensor:
        assert isinstance(operand, SparseOperand)
        return run_operand(operand, x2d, bias, activation)  # fused in the epilogue

    def conv_unsupported_reason(self, spec: ConvSpec) -> str | None:
        if spec.groups != 1:
            return f"groups={spec.groups}: the im2col GEMM runs groups=1 only"
        padding = _padding(spec)
        if isinstance(padding, str):
            return padding
        if spec.pattern.conv_order != "rsc" and spec.kernel_size != (1, 1):
            return (
                f"conv order {spec.pattern.conv_order!r}: the im2col GEMM reduces in (R,S,C) order, so a "
                f"{spec.kernel_size[0]}x{spec.kernel_size[1]} conv needs 2:4 groups in 'rsc' order"
            )
        return self._unsupported(spec.pattern, spec.dtype, spec.device)

    def prepare_conv(self, dense_weight: torch.Tensor) -> SparseOperand:
        """The operand of a weight :meth:`conv_unsupported_reason` accepted (2:4 in (R,S,C) order)."""
        return self._prepare(to_reduction_view(dense_weight, "rsc"))

    def conv2d(
        self, x: torch.Tensor, operand: object, bias: torch.Tensor | None, spec: ConvSpec
    ) -> torch.Tensor:
        assert isinstance(operand, SparseOperand)
        padding = _padding(spec)
        assert not isinstance(padding, str), padding
        n, c, h, w = x.shape
        (kh, kw), (sh, sw), (dh, dw) = spec.kernel_size, spec.stride, spec.dilation
        p = conv_output_size(h, kh, sh, padding[0], dh)
        q = conv_output_size(w, kw, sw, padding[1], dw)
        depth_pad = operand.values.shape[1] * 2
        direct = spec.kernel_size == (1, 1) and spec.stride == (1, 1) and padding == (0, 0) and depth_pad == c
        if direct:  # a view for channels-last input, one transpose otherwise
            rows = x.permute(0, 2, 3, 1).reshape(-1, c)
        else:
            rows = im2col_rsc(x, spec.kernel_size, spec.stride, padding, spec.dilation, k_pad=depth_pad)
        return rows_to_nchw(run_operand(operand, rows, bias), n, p, q)


def run_operand(
    operand: SparseOperand, x2d: torch.Tensor, bias: torch.Tensor | None, activation: str = "none"
) -> torch.Tensor:
    """:func:`knsparse.ops.sparse_gemm` of a padded :class:`SparseOperand`: ``x2d [M, depth]`` (or already
    ``depth_pad`` wide, as im2col writes it) to ``[M, rows]``."""
    rows_pad, depth_pad = operand.values.shape[0], operand.values.shape[1] * 2
    if x2d.shape[-1] != depth_pad:
        x2d = F.pad(x2d, (0, depth_pad - x2d.shape[-1]))
    if bias is not None and rows_pad != operand.rows:
        bias = F.pad(bias, (0, rows_pad - operand.rows))
    y = gemm.sparse_gemm(operand.values, operand.meta, x2d, bias, activation)
    return y if rows_pad == operand.rows else y[:, : operand.rows]


KNSPARSE_CUDA = KnsparseCudaBackend()
