"""im2col with the reduction axis in (R, S, C) order (channels innermost).

A convolution with weight ``[Cout, Cin, R, S]`` is the GEMM

    y[(n, p, q), cout] = sum_{(r, s, c)} cols[(n, p, q), (r, s, c)] * w_rsc[cout, (r, s, c)]

where ``cols = im2col_rsc(x)`` and ``w_rsc = knsparse.core.masks.to_reduction_view(weight, "rsc")``.
Ordering the reduction axis (R, S, C) puts 4 consecutive *input channels* of one kernel
position in every 2:4 group — the TensorRT rule and knsparse's default conv mask grouping — so
one mask serves TensorRT and knsparse's own im2col + sparse GEMM.

``knsparse::im2col_rsc`` is the torch custom op over the native kernel (fp16/bf16 CUDA, any
input layout; channels-last input makes its loads 16-byte vectors), with a fake implementation
for ``torch.compile`` / ``torch.export``.

``k_pad`` appends zero columns so the reduction length can be rounded up to what a sparse GEMM
needs (the weight's reduction view is padded with the same zero columns, which are valid 2:4
groups).

The public functions take torch tensors or any array exposing ``__dlpack__`` /
``__cuda_array_interface__`` (CuPy, JAX, Numba, NumPy), viewed without a copy
(:mod:`knsparse.ops.interop`); they return torch tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..core.masks import to_reduction_view
from .device import available, require_device
from .interop import ArrayLike, to_torch, to_torch_optional
from .native import Im2colArgs, run_im2col

IntPair = int | tuple[int, int]


def _pair(v: IntPair, name: str) -> tuple[int, int]:
    pair = (v, v) if isinstance(v, int) else tuple(v)
    if len(pair) != 2 or not all(isinstance(i, int) for i in pair):
        raise TypeError(f"{name} must be an int or a pair of ints, got {v!r}")
    return pair  # type: ignore[return-value]


def conv_output_size(size: int, kernel: int, stride: int, padding: int, dilation: int) -> int:
    """Output length of a convolution along one spatial axis (PyTorch's formula)."""
    return (size + 2 * padding - dilation * (kernel - 1) - 1) // stride + 1


def _geometry(
    x: torch.Tensor,
    kernel_size: IntPair,
    stride: IntPair,
    padding: IntPair,
    dilation: IntPair,
    k_pad: int | None,
) -> tuple[tuple[int, int], tuple[int, int], tuple[int, int], tuple[int, int], int, int, int]:
    if x.dim() != 4:
        raise ValueError(f"im2col_rsc expects x of shape [N, C, H, W], got {tuple(x.shape)}")
    kernel, strides, pads, dils = (
        _pair(kernel_size, "kernel_size"),
        _pair(stride, "stride"),
        _pair(padding, "padding"),
        _pair(dilation, "dilation"),
    )
    if min(kernel + strides + dils) < 1 or min(pads) < 0:
        raise ValueError(
            f"kernel_size {kernel}, stride {strides} and dilation {dils} must be positive and "
            f"padding {pads} non-negative"
        )
    _, c, h, w = x.shape
    p = conv_output_size(h, kernel[0], strides[0], pads[0], dils[0])
    q = conv_output_size(w, kernel[1], strides[1], pads[1], dils[1])
    if p < 1 or q < 1:
        raise ValueError(
            f"kernel {kernel} with dilation {dils} does not fit input {tuple(x.shape)} padded by {pads}"
        )
    depth = kernel[0] * kernel[1] * c
    k_pad = depth if k_pad is None else k_pad
    if k_pad < depth:
        raise ValueError(f"k_pad={k_pad} is smaller than the reduction length R*S*C={depth}")
    return kernel, strides, pads, dils, p, q, k_pad


def im2col_rsc_ref(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    k_pad: int | None = None,
) -> torch.Tensor:
    """Plain-PyTorch im2col, reduction axis in (R, S, C) order.

    Args:
        x: ``[N, C, H, W]`` (any layout, any dtype, any device; a tensor or a DLPack /
            CUDA-array-interface array).
        kernel_size, stride, padding, dilation: as in ``nn.Conv2d`` (int or pair).
        k_pad: number of output columns, >= ``R*S*C`` (default ``R*S*C``); extra columns are 0.

    Returns:
        torch tensor ``[N*P*Q, k_pad]``, contiguous: row ``(n, p, q)``, column ``(r*S + s)*C + c`` holds
        ``x[n, c, p*stride_h - pad_h + r*dil_h, q*stride_w - pad_w + s*dil_w]`` (0 outside).
    """
    x = to_torch(x, "x")
    (kh, kw), (sh, sw), (ph, pw), (dh, dw), p, q, k_pad = _geometry(
        x, kernel_size, stride, padding, dilation, k_pad
    )
    n, c = x.shape[:2]
    padded = F.pad(x, (pw, pw, ph, ph))
    # [N, C, P, Q, span_h, span_w] windows, then every dilation-th tap: [N, C, P, Q, R, S]
    windows = padded.unfold(2, dh * (kh - 1) + 1, sh).unfold(3, dw * (kw - 1) + 1, sw)
    taps = windows[..., ::dh, ::dw]
    cols = taps.permute(0, 2, 3, 4, 5, 1).reshape(n * p * q, kh * kw * c)
    return F.pad(cols, (0, k_pad - cols.shape[1]))


@torch.library.custom_op("knsparse::im2col_rsc", mutates_args=(), device_types="cuda")
def _im2col_rsc_op(
    x: torch.Tensor,
    kernel_size: list[int],
    stride: list[int],
    padding: list[int],
    dilation: list[int],
    k_pad: int,
) -> torch.Tensor:
    *_, p, q, _ = _geometry(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), k_pad)
    xc = x.contiguous(memory_format=torch.channels_last)
    out = torch.empty((x.shape[0] * p * q, k_pad), dtype=x.dtype, device=x.device)
    if out.numel() == 0:
        return out
    n, c, h, w = xc.shape
    args = Im2colArgs(
        x=xc.data_ptr(),
        n=n,
        c=c,
        h=h,
        w=w,
        stride_n=xc.stride(0),
        stride_c=xc.stride(1),
        stride_h=xc.stride(2),
        stride_w=xc.stride(3),
        kernel_h=kernel_size[0],
        kernel_w=kernel_size[1],
        conv_stride_h=stride[0],
        conv_stride_w=stride[1],
        pad_h=padding[0],
        pad_w=padding[1],
        dil_h=dilation[0],
        dil_w=dilation[1],
        out_h=p,
        out_w=q,
        k_pad=k_pad,
        out=out.data_ptr(),
    )
    run_im2col(args, x.device.index, torch.cuda.current_stream(x.device).cuda_stream)
    return out


@_im2col_rsc_op.register_fake
def _im2col_rsc_fake(x, kernel_size, stride, padding, dilation, k_pad):
    *_, p, q, _ = _geometry(x, tuple(kernel_size), tuple(stride), tuple(padding), tuple(dilation), k_pad)
    return x.new_empty((x.shape[0] * p * q, k_pad))


def im2col_rsc_cuda(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    k_pad: int | None = None,
) -> torch.Tensor:
    """The CUDA kernel (``knsparse::im2col_rsc``) with :func:`im2col_rsc_ref` semantics; x is
    fp16/bf16 on a device the native library serves (RuntimeError naming the reason if not), a
    tensor or a DLPack / CUDA-array-interface array; returns a torch tensor."""
    x = to_torch(x, "x")
    kernel, strides, pads, dils, _, _, k_pad = _geometry(x, kernel_size, stride, padding, dilation, k_pad)
    if x.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"the im2col kernel moves 16-bit words: x must be float16 or bfloat16, got {x.dtype}")
    require_device(x.device)
    return torch.ops.knsparse.im2col_rsc(x, list(kernel), list(strides), list(pads), list(dils), k_pad)


def im2col_rsc(
    x: ArrayLike,
    kernel_size: IntPair,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
    k_pad: int | None = None,
) -> torch.Tensor:
    """:func:`im2col_rsc_ref` semantics; fp16/bf16 CUDA inputs run knsparse's CUDA kernel when
    the native library serves the device, everything else runs the reference. ``x`` is a tensor
    or a DLPack / CUDA-array-interface array (CuPy, JAX, Numba, NumPy); returns a torch tensor."""
    x = to_torch(x, "x")
    if x.is_cuda and x.dtype in (torch.float16, torch.bfloat16) and available(x.device):
        return im2col_rsc_cuda(x, kernel_size, stride, padding, dilation, k_pad)
    return im2col_rsc_ref(x, kernel_size, stride, padding, dilation, k_pad)


def rows_to_nchw(y: ArrayLike, n: int, p: int, q: int) -> torch.Tensor:
    """``[N*P*Q, Cout]`` GEMM rows (a tensor or a DLPack / CUDA-array-interface array) back to an
    ``[N, Cout, P, Q]`` torch tensor (a view of ``y``'s memory: no copy)."""
    y = to_torch(y, "y")
    return y.reshape(n, p, q, y.shape[-1]).permute(0, 3, 1, 2)


def conv2d_via_im2col_ref(
    x: ArrayLike,
    weight: ArrayLike,
    bias: ArrayLike | None = None,
    stride: IntPair = 1,
    padding: IntPair = 0,
    dilation: IntPair = 1,
) -> torch.Tensor:
    """``F.conv2d`` (groups=1) computed as ``im2col_rsc(x) @ to_reduction_view(weight, "rsc").T``.

    Args:
        x: ``[N, Cin, H, W]``; weight: ``[Cout, Cin, R, S]``; bias: ``[Cout]`` or None (tensors
            or DLPack / CUDA-array-interface arrays).

    Returns:
        torch tensor ``[N, Cout, P, Q]`` in ``x.dtype``.
    """
    x, weight, bias = to_torch(x, "x"), to_torch(weight, "weight"), to_torch_optional(bias, "bias")
    if weight.dim() != 4 or x.dim() != 4 or weight.shape[1] != x.shape[1]:
        raise ValueError(
            f"conv2d_via_im2col_ref needs x [N, C, H, W] and weight [Cout, C, R, S] with equal C "
            f"(groups=1), got x {tuple(x.shape)} and weight {tuple(weight.shape)}"
        )
    kernel = (weight.shape[2], weight.shape[3])
    *_, p, q, _ = _geometry(x, kernel, stride, padding, dilation, None)
    y = im2col_rsc_ref(x, kernel, stride, padding, dilation) @ to_reduction_view(weight, "rsc").t()
    if bias is not None:
        y = y + bias
    return rows_to_nchw(y, x.shape[0], p, q)
