"""knsparse's own CUDA backend: 2:4 sparse GEMM on sparse tensor cores (CUTLASS) and im2col.

The native library ``_knsparse_cuda`` (built from ``csrc/``) registers the torch custom ops
``torch.ops.knsparse_cuda.sparse_gemm`` and ``torch.ops.knsparse_cuda.im2col_rsc``; this module
loads it, registers their fake (meta) implementations so ``torch.compile`` / ``torch.export``
can trace them, says why the backend is unavailable when it is, and converts weight metadata
for the architecture.

Weights travel as ``values`` ``[rows, depth/2]`` and ``meta`` as ``knsparse.pack`` writes them
(int16 ``[rows, depth/16]``, CUTLASS ``ColumnMajorInterleaved<2>`` reordered, bit-exact with
``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``).
Ampere / Ada (compute capability 8.x) read that metadata directly; Hopper (9.0) reads another
layout, which :func:`knsparse.backends.cutlass_meta.prepare_meta` produces once per layer.
:data:`KNSPARSE_CUDA` is the registry backend built on these functions.
"""

from __future__ import annotations

import functools
import os
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from ..im2col import conv_output_size, im2col_rsc, rows_to_nchw
from ..masks import to_reduction_view
from ..pack import Packed24, pack_24, unpack_24
from .base import ACTIVATIONS, Backend, ConvSpec, LinearSpec, activate
from .cutlass_meta import prepare_meta, round_up, sm80_meta_from_sm90

LIBRARY_ENV = "KNSPARSE_CUDA_LIBRARY"
# Output columns (tokens) are padded to this many elements by the kernels (16-byte rows).
COLUMN_ALIGN = 8

_BUILD_HINT = (
    "build it with `cmake -B build -DCMAKE_BUILD_TYPE=Release && cmake --build build -j` "
    "or `KNSPARSE_BUILD_CUDA=1 pip install -e . --no-build-isolation` on a machine with nvcc and "
    "the nvidia-cutlass package"
)


def _library_candidates() -> list[Path]:
    explicit = os.environ.get(LIBRARY_ENV)
    if explicit:
        return [Path(explicit)]
    package_dir = Path(__file__).resolve().parent.parent
    return sorted(package_dir.glob("_knsparse_cuda*.so"))


@functools.cache
def _load_error() -> str | None:
    """Load the native library once; the reason it could not be loaded, or None."""
    candidates = _library_candidates()
    if not candidates:
        where = os.environ.get(LIBRARY_ENV) or str(Path(__file__).resolve().parent.parent)
        return f"knsparse_cuda library not built (no _knsparse_cuda*.so in {where}); {_BUILD_HINT}"
    path = candidates[0]
    if not path.is_file():
        return f"{LIBRARY_ENV}={path} does not exist"
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return f"failed to load {path}: {exc}"
    _register_fakes()
    return None


def unavailable_reason(device: torch.device | str | int | None = None) -> str | None:
    """Why the backend cannot run on ``device`` (default: the current CUDA device), or None."""
    if not torch.cuda.is_available():
        return "no CUDA device (torch.cuda.is_available() is False)"
    error = _load_error()
    if error is not None:
        return error
    index = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if index.type != "cuda":
        return f"knsparse-cuda runs on CUDA devices, not {index}"
    major, minor = torch.cuda.get_device_capability(index)
    if major != 8 and (major, minor) != (9, 0):
        return (
            f"compute capability {major}.{minor} has no knsparse_cuda kernels "
            "(sm_80 kernels serve 8.x, sm_90a kernels serve 9.0)"
        )
    return None


def available(device: torch.device | str | int | None = None) -> bool:
    """True if the sparse GEMM and im2col kernels can run on ``device``."""
    return unavailable_reason(device) is None


def _require(device: torch.device) -> None:
    if torch.compiler.is_compiling():  # checked when the eager call or the trace's first run happened
        return
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"knsparse-cuda backend unavailable: {reason}")


def _register_fakes() -> None:
    @torch.library.register_fake("knsparse_cuda::sparse_gemm")
    def _sparse_gemm_fake(values, meta, x, bias, activation):
        return sparse_gemm_output_like(values, x)

    @torch.library.register_fake("knsparse_cuda::im2col_rsc")
    def _im2col_rsc_fake(x, kernel_size, stride, padding, dilation, k_pad):
        n, _, h, w = x.shape
        p = (h + 2 * padding[0] - dilation[0] * (kernel_size[0] - 1) - 1) // stride[0] + 1
        q = (w + 2 * padding[1] - dilation[1] * (kernel_size[1] - 1) - 1) // stride[1] + 1
        return x.new_empty((n * p * q, k_pad))


def sparse_gemm_output_like(values: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """An uninitialised tensor shaped and strided like the op's output: ``[rows, cols]`` with
    row stride ``round_up(cols, 8)`` (the fake implementation of ``knsparse_cuda::sparse_gemm``)."""
    rows, cols = values.shape[0], x.shape[0]
    return x.new_empty_strided((rows, cols), (round_up(cols, COLUMN_ALIGN), 1))


# --- the GEMM and its reference twin ------------------------------------------------------------


def _check_gemm_args(
    values: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> None:
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if values.dtype not in (torch.float16, torch.bfloat16):
        # torch's float32 CUTLASS format is 1:2 with another metadata meaning: refuse, never misread.
        raise TypeError(f"values must be float16 or bfloat16 (2:4 CUTLASS format), got {values.dtype}")
    if values.dim() != 2:
        raise ValueError(f"values must be [rows, depth/2], got shape {tuple(values.shape)}")
    depth = values.shape[1] * 2
    if x.shape[-1] != depth:
        raise ValueError(f"x has {x.shape[-1]} features but the 2:4 weight has depth {depth}")
    if bias is not None and tuple(bias.shape) != (values.shape[0],):
        raise ValueError(f"bias must have shape ({values.shape[0]},), got {tuple(bias.shape)}")


def dense_weight(values: torch.Tensor, meta: torch.Tensor) -> torch.Tensor:
    """The dense ``[rows, depth]`` weight of ``values`` and ``meta`` (either layout)."""
    rows, depth = values.shape[0], values.shape[1] * 2
    if meta.dtype == torch.uint8:
        meta = sm80_meta_from_sm90(meta, rows, depth)
    return unpack_24(Packed24(values, meta, (rows, depth)))


def sparse_gemm_ref(
    values: torch.Tensor,
    meta: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`sparse_gemm`: ``act(x @ W.T + bias)`` in fp32, cast to
    ``x.dtype``. ``x`` is ``[..., depth]``; returns ``[..., rows]``. Runs on any device."""
    _check_gemm_args(values, x, bias, activation)
    w = dense_weight(values, meta).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return activate(y, activation).to(x.dtype)


def sparse_gemm(
    values: torch.Tensor,
    meta: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` on sparse tensor cores, fp32 accumulation, fused epilogue.

    Args:
        values: ``[rows, depth/2]`` fp16/bf16 kept weights (``knsparse.pack``).
        meta: :func:`prepare_meta` of the pack metadata for the device's architecture.
        x: ``[..., depth]`` activations, same dtype and device as ``values``.
        bias: ``[rows]`` or None.
        activation: ``"none"``, ``"relu"`` or ``"gelu"`` (erf GELU, like ``nn.GELU()``).

    Returns:
        ``[..., rows]``. The kernel writes it feature-major (the sparse operand must be the
        left one), so the result is a transposed view: ``y.t()`` of a 2-D result is a
        contiguous-row ``[rows, tokens]`` buffer with row stride ``round_up(tokens, 8)``.
    """
    _check_gemm_args(values, x, bias, activation)
    _require(x.device)
    rows = values.shape[0]
    out = torch.ops.knsparse_cuda.sparse_gemm(values, meta, x.reshape(-1, x.shape[-1]), bias, activation)
    return out.t().reshape(*x.shape[:-1], rows)


def im2col_rsc_cuda(
    x: torch.Tensor,
    kernel_size: tuple[int, int],
    stride: tuple[int, int],
    padding: tuple[int, int],
    dilation: tuple[int, int],
    k_pad: int,
) -> torch.Tensor:
    """The CUDA im2col kernel (see :func:`knsparse.im2col.im2col_rsc` for the semantics)."""
    _require(x.device)
    return torch.ops.knsparse_cuda.im2col_rsc(
        x, list(kernel_size), list(stride), list(padding), list(dilation), k_pad
    )


# --- the registry backend ---------------------------------------------------------------------


@dataclass(frozen=True)
class SparseOperand:
    """A 2:4 weight ready for :func:`sparse_gemm` on one device.

    ``values [rows_pad, depth_pad/2]`` and ``meta`` (:func:`prepare_meta`) of the weight
    zero-padded by ``knsparse.pack.pack_24`` to the CUTLASS multiples; ``rows`` and ``depth``
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
        return self._unsupported(spec.pattern, spec.dtype, spec.device)

    def prepare_conv(self, dense_weight: torch.Tensor) -> SparseOperand:
        try:
            return self._prepare(to_reduction_view(dense_weight, "rsc"))
        except ValueError as exc:
            raise ValueError(
                f"knsparse-cuda needs conv weights that are 2:4 in (R,S,C) order (conv_order='rsc'): {exc}"
            ) from exc

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
    """:func:`sparse_gemm` of a padded :class:`SparseOperand`: ``x2d [M, depth]`` (or already
    ``depth_pad`` wide, as im2col writes it) to ``[M, rows]``."""
    rows_pad, depth_pad = operand.values.shape[0], operand.values.shape[1] * 2
    if x2d.shape[-1] != depth_pad:
        x2d = F.pad(x2d, (0, depth_pad - x2d.shape[-1]))
    if bias is not None and rows_pad != operand.rows:
        bias = F.pad(bias, (0, rows_pad - operand.rows))
    y = sparse_gemm(operand.values, operand.meta, x2d, bias, activation)
    return y if rows_pad == operand.rows else y[:, : operand.rows]


KNSPARSE_CUDA = KnsparseCudaBackend()


# Load at import (when built) so the ops exist before any torch.compile trace reaches them.
_load_error()
