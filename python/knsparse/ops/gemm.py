"""The 2:4 sparse GEMM op: ``knsparse::sparse_gemm`` (a torch custom op over the native
library), its fake implementation and its plain-PyTorch twin :func:`sparse_gemm_ref`.

Weights travel as ``values`` ``[rows, depth/2]`` and ``meta``: the int16 ``[rows, depth/16]``
CUTLASS metadata ``knsparse.core.pack`` writes (the Ampere kernels read it as is) or its uint8 Hopper
layout (:func:`knsparse.ops.meta.prepare_meta`); the metadata's dtype selects the kernel. The
op returns ``act(x @ W.T + bias)`` token-major, ``[tokens, rows]`` contiguous like ``F.linear``:
the Hopper kernel stores it so directly (any token count); the Ampere kernel stores
feature-major and needs tokens % 8 == 0, so the op zero-pads ``x`` and transposes its result.

The public functions take torch tensors or any array exposing ``__dlpack__`` /
``__cuda_array_interface__`` (CuPy, JAX, Numba, NumPy), viewed without a copy
(:mod:`knsparse.ops.interop`); they return torch tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.pack import Packed24, unpack_24
from .device import require_device
from .interop import ArrayLike, to_torch, to_torch_optional
from .meta import round_up, sm80_meta_from_sm90, sm90_meta_shape
from .native import ACTIVATION_CODES, CONFIG_CODES, DTYPE_CODES, GemmArgs, gemm_workspace, run_gemm

ACTIVATIONS = ("none", "relu", "gelu")
"""Activations a sparse GEMM applies to its output (``"gelu"`` is the erf GELU of
``nn.GELU()``); the knsparse-cuda kernels fuse them into the GEMM epilogue."""

COLUMN_ALIGN = 8  # 16 bytes of 16-bit elements: the Ampere kernel's token multiple
_ARCH_OF_META = {torch.int16: 80, torch.uint8: 90}


def activate(y: ArrayLike, activation: str) -> torch.Tensor:
    """``y`` through one of :data:`ACTIVATIONS` (the unfused path and the references); ``y`` is
    a tensor or a DLPack / CUDA-array-interface array, the result a torch tensor (``y`` itself,
    viewed, for ``"none"``)."""
    y = to_torch(y, "y")
    if activation == "relu":
        return F.relu(y)
    if activation == "gelu":
        return F.gelu(y)
    if activation != "none":
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    return y


def check_gemm_args(
    values: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, activation: str
) -> None:
    """The checks shared by :func:`sparse_gemm` and :func:`sparse_gemm_ref`."""
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


def check_kernel_args(
    values: torch.Tensor, meta: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, config: str
) -> None:
    """What the kernels need beyond :func:`check_gemm_args`: one dtype, one device, metadata
    whose dtype and shape are one of the two layouts of this weight."""
    if x.dtype != values.dtype or (bias is not None and bias.dtype != values.dtype):
        raise TypeError(f"x and bias must have the dtype of values ({values.dtype}), got {x.dtype}")
    devices = {t.device for t in (values, meta, x) + (() if bias is None else (bias,))}
    if len(devices) != 1:
        raise ValueError(f"values, meta, x and bias must be on one device, got {sorted(map(str, devices))}")
    rows, depth = values.shape[0], values.shape[1] * 2
    layouts = {torch.int16: (rows, depth // 16), torch.uint8: sm90_meta_shape(rows, depth)}
    if meta.dtype not in layouts or tuple(meta.shape) != layouts[meta.dtype]:
        raise ValueError(
            f"meta must be int16 {layouts[torch.int16]} (Ampere layout, knsparse.core.pack) or uint8 "
            f"{layouts[torch.uint8]} (Hopper layout, prepare_meta) for a [{rows}, {depth}] weight, "
            f"got {meta.dtype} {tuple(meta.shape)}"
        )
    if config not in CONFIG_CODES:
        raise ValueError(f"config must be one of {tuple(CONFIG_CODES)}, got {config!r}")


def dense_weight(values: ArrayLike, meta: ArrayLike) -> torch.Tensor:
    """The dense ``[rows, depth]`` torch tensor of ``values`` and ``meta`` (either layout; tensors
    or DLPack / CUDA-array-interface arrays)."""
    values, meta = to_torch(values, "values"), to_torch(meta, "meta")
    rows, depth = values.shape[0], values.shape[1] * 2
    if meta.dtype == torch.uint8:
        meta = sm80_meta_from_sm90(meta, rows, depth)
    return unpack_24(Packed24(values, meta, (rows, depth)))


def sparse_gemm_ref(
    values: ArrayLike,
    meta: ArrayLike,
    x: ArrayLike,
    bias: ArrayLike | None = None,
    activation: str = "none",
) -> torch.Tensor:
    """Plain-PyTorch twin of :func:`sparse_gemm`: ``act(x @ W.T + bias)`` in fp32, cast to
    ``x.dtype``. ``x`` is ``[..., depth]``; returns a torch tensor ``[..., rows]``. Runs on any
    device; the arguments may be DLPack / CUDA-array-interface arrays, as for :func:`sparse_gemm`."""
    values, meta, x = to_torch(values, "values"), to_torch(meta, "meta"), to_torch(x, "x")
    bias = to_torch_optional(bias, "bias")
    check_gemm_args(values, x, bias, activation)
    w = dense_weight(values, meta).float()
    y = F.linear(x.float(), w, None if bias is None else bias.float())
    return activate(y, activation).to(x.dtype)


def _aligned(t: torch.Tensor) -> bool:
    return t.data_ptr() % 16 == 0


def _contiguous_aligned(t: torch.Tensor) -> torch.Tensor:
    t = t.contiguous()
    return t if _aligned(t) else t.clone()


def _gemm_operand(x: torch.Tensor) -> torch.Tensor:
    """``x [cols, depth]`` with unit column stride, a row stride that is a multiple of 8 and at
    least ``depth`` (not an expanded row), and a 16-byte aligned base: a copy only if needed."""
    cols, depth = x.shape
    if (
        x.stride(1) == 1
        and (cols <= 1 or (x.stride(0) >= depth and x.stride(0) % COLUMN_ALIGN == 0))
        and _aligned(x)
    ):
        return x
    return _contiguous_aligned(x)


def gemm_args(
    values: torch.Tensor,
    meta: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    out: torch.Tensor,
    ldo: int,
    activation: str,
    config: str = "auto",
) -> GemmArgs:
    """The library's argument struct for tensors already laid out as it needs them."""
    return GemmArgs(
        rows=values.shape[0],
        cols=x.shape[0],
        depth=values.shape[1] * 2,
        values=values.data_ptr(),
        meta=meta.data_ptr(),
        x=x.data_ptr(),
        ldx=x.stride(0) if x.shape[0] > 1 else x.shape[1],
        bias=None if bias is None else bias.data_ptr(),
        out=out.data_ptr(),
        ldo=ldo,
        dtype=DTYPE_CODES[str(values.dtype).removeprefix("torch.")],
        activation=ACTIVATION_CODES[activation],
        config=CONFIG_CODES[config],
    )


@torch.library.custom_op("knsparse::sparse_gemm", mutates_args=(), device_types="cuda")
def _sparse_gemm_op(
    values: torch.Tensor,
    meta: torch.Tensor,
    x: torch.Tensor,
    bias: torch.Tensor | None,
    activation: str,
    config: str,
) -> torch.Tensor:
    rows, cols = values.shape[0], x.shape[0]
    arch = _ARCH_OF_META[meta.dtype]
    device = x.device.index
    stream = torch.cuda.current_stream(x.device).cuda_stream
    values, meta = _contiguous_aligned(values), _contiguous_aligned(meta)
    bias = None if bias is None else _contiguous_aligned(bias)
    if arch == 90:
        x = _gemm_operand(x)
        out = torch.empty((cols, rows), dtype=x.dtype, device=x.device)
        if cols == 0:
            return out
        args = gemm_args(values, meta, x, bias, out, rows, activation, config)
        ws_bytes = gemm_workspace(args, arch, device)
        workspace = torch.empty(ws_bytes, dtype=torch.uint8, device=x.device) if ws_bytes else None
        run_gemm(args, arch, None if workspace is None else workspace.data_ptr(), ws_bytes, device, stream)
        return out
    cols_pad = round_up(cols, COLUMN_ALIGN)
    x = _gemm_operand(F.pad(x, (0, 0, 0, cols_pad - cols)) if cols_pad != cols else x)
    feature_major = torch.empty((rows, cols_pad), dtype=x.dtype, device=x.device)
    if cols == 0:
        return feature_major.t()[:0].contiguous()
    run_gemm(
        gemm_args(values, meta, x, bias, feature_major, cols_pad, activation), arch, None, 0, device, stream
    )
    return feature_major[:, :cols].t().contiguous()


@_sparse_gemm_op.register_fake
def _sparse_gemm_fake(values, meta, x, bias, activation, config):
    return x.new_empty((x.shape[0], values.shape[0]))


def sparse_gemm(
    values: ArrayLike,
    meta: ArrayLike,
    x: ArrayLike,
    bias: ArrayLike | None = None,
    activation: str = "none",
    config: str = "auto",
) -> torch.Tensor:
    """``act(x @ W.T + bias)`` on sparse tensor cores, fp32 accumulation, fused epilogue.

    Every array argument is a torch tensor or any array exposing ``__dlpack__`` or
    ``__cuda_array_interface__`` (CuPy, JAX, Numba), viewed without a copy, so a CuPy pipeline
    calls the GEMM directly; the result is a torch tensor (``cupy.from_dlpack(out)`` views it).

    Args:
        values: ``[rows, depth/2]`` fp16/bf16 kept weights (``knsparse.core.pack``).
        meta: :func:`knsparse.ops.meta.prepare_meta` of the pack metadata for the device.
        x: ``[..., depth]`` activations, same dtype and device as ``values``; any token count.
        bias: ``[rows]`` or None.
        activation: ``"none"``, ``"relu"`` or ``"gelu"`` (erf GELU, like ``nn.GELU()``).
        config: Hopper tile configuration, ``"auto"`` (by tile count against the SM count),
            ``"large"`` (128x128 cooperative) or ``"small"`` (64x128 ping-pong).

    Returns:
        torch tensor ``[..., rows]``, contiguous (the layout of ``F.linear``), on ``x``'s device.
    """
    values, meta, x = to_torch(values, "values"), to_torch(meta, "meta"), to_torch(x, "x")
    bias = to_torch_optional(bias, "bias")
    check_gemm_args(values, x, bias, activation)
    check_kernel_args(values, meta, x, bias, config)
    require_device(x.device)
    rows = values.shape[0]
    out = torch.ops.knsparse.sparse_gemm(values, meta, x.reshape(-1, x.shape[-1]), bias, activation, config)
    return out.reshape(*x.shape[:-1], rows)
