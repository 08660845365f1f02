"""Fused residual scoring ``S = |X - V H|`` for a bucket of NMF fits, optionally with k:n selection.

Inputs follow :mod:`.nmf`: ``X [B, mp, np]``, ``V [B, mp, r]``, ``H [B, r, np]`` float32 and int32
``sizes [B, 2]``. Scores are zero outside ``sizes``. The Triton kernel computes ``V H`` one
``[BM, BN]`` tile at a time and never materialises the product; with a k:n pattern it also
keeps the ``k`` highest scores of every ``n`` consecutive columns (or rows, ``along_rows=True``,
for matrices stored transposed) in the same pass and writes the bool mask (ties go to the lowest
index, as in :func:`knsparse.core.masks.nm_mask`).

Public entry points (``torch.library`` custom ops: Triton on CUDA; on CPU the C twin of
:func:`residual_ref` for scores and the reference for masks): :func:`residual_scores` and
:func:`residual_nm_mask`; references :func:`residual_ref` and :func:`residual_nm_ref`; Triton
launchers :func:`residual_triton` and :func:`residual_nm_triton`; C launcher :func:`residual_cpu`.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from knsparse.core.masks import nm_mask
from knsparse.core.pattern import Pattern

from .launch import eager, for_device, next_pow2
from .nmf import valid_masks
from .nmf_cpu import residual_native_

_MAX_FUSED_GROUP = 16  # larger or non-power-of-two groups take the scores-then-nm_mask path


def _check(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor
) -> tuple[int, int, int, int]:
    if x.dim() != 3 or v.dim() != 3 or h.dim() != 3:
        raise ValueError(
            f"expected X [B, mp, np], V [B, mp, r], H [B, r, np], got {tuple(x.shape)}, "
            f"{tuple(v.shape)}, {tuple(h.shape)}"
        )
    b, mp, np_ = x.shape
    rank = v.shape[2]
    if v.shape[:2] != (b, mp) or tuple(h.shape) != (b, rank, np_) or tuple(sizes.shape) != (b, 2):
        raise ValueError(
            f"shape mismatch: X {tuple(x.shape)}, V {tuple(v.shape)}, H {tuple(h.shape)}, "
            f"sizes {tuple(sizes.shape)}"
        )
    for name, t in (("X", x), ("V", v), ("H", h)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
    if sizes.dtype != torch.int32:
        raise TypeError(f"sizes must be int32, got {sizes.dtype}")
    return b, mp, np_, rank


def _check_groups(sizes: torch.Tensor, pattern: Pattern, along_rows: bool) -> None:
    axis, what = (0, "rows") if along_rows else (1, "columns")
    bad = (sizes[:, axis] % pattern.n != 0).nonzero()
    if len(bad):
        i = int(bad[0, 0])
        raise ValueError(
            f"matrix {i} of the bucket has {int(sizes[i, axis])} {what}, not a multiple of n={pattern.n} "
            f"for pattern {pattern}"
        )


def residual_ref(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Reference: ``|X - V H|`` as ``[B, mp, np]`` float32, zero outside ``sizes``."""
    _, mp, np_, _ = _check(x, v, h, sizes)
    rows, cols = valid_masks(sizes, mp, np_, x.device)
    s = torch.baddbmm(x, v, h, alpha=-1.0).abs_()
    if bool(rows.all()) and bool(cols.all()):
        return s
    return s.masked_fill_(~(rows & cols), 0.0)


def residual_cpu(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, out: torch.Tensor | None = None
) -> torch.Tensor:
    """C twin of :func:`residual_ref` for CPU tensors (the reference where no C compiler exists).

    ``out``: a contiguous ``[B, mp, np]`` float32 CPU tensor to write the scores into, and return; it
    may be ``x`` itself (scores in place of the matrices, saving a bucket-sized allocation).
    """
    b, mp, np_, _ = _check(x, v, h, sizes)
    if x.is_cuda:
        raise ValueError("residual_cpu needs CPU tensors")
    if out is None:
        out = torch.empty(b, mp, np_, dtype=torch.float32)
    elif out.shape != x.shape or out.dtype != torch.float32 or not out.is_contiguous() or out.is_cuda:
        raise ValueError(f"out must be a contiguous float32 CPU tensor of shape {tuple(x.shape)}")
    x, v, h, sizes = (t.contiguous() for t in (x, v, h, sizes.to(torch.int32)))
    if not residual_native_(x, v, h, sizes, out):
        out.copy_(residual_ref(x, v, h, sizes))
    return out


def _nm_keep(scores: torch.Tensor, sizes: torch.Tensor, pattern: Pattern, along_rows: bool) -> torch.Tensor:
    """k:n mask of a bucket of scores via :func:`knsparse.core.masks.nm_mask`, False outside ``sizes``."""
    if along_rows:
        return _nm_keep(scores.mT, sizes.flip(1), pattern, False).mT
    b, mp, np_ = scores.shape
    pad = -np_ % pattern.n
    flat = torch.nn.functional.pad(scores, (0, pad)).reshape(b * mp, np_ + pad)
    keep = nm_mask(flat, pattern).reshape(b, mp, np_ + pad)[..., :np_]
    rows, cols = valid_masks(sizes, mp, np_, scores.device)
    return keep & rows & cols


def residual_nm_ref(
    x: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    sizes: torch.Tensor,
    pattern: str | Pattern,
    along_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference: scores as :func:`residual_ref` and the bool k:n mask keeping the ``k`` highest of
    every ``n`` consecutive columns (rows if ``along_rows``) of each matrix."""
    pattern = Pattern.parse(pattern)
    _check_groups(sizes, pattern, along_rows)
    s = residual_ref(x, v, h, sizes)
    return s, _nm_keep(s, sizes, pattern, along_rows)


@triton.jit
def _group_keep(s, R: tl.constexpr, C: tl.constexpr, GROUP_K: tl.constexpr, GROUP_N: tl.constexpr):
    """Bool ``[R, C]``: the GROUP_K best of every GROUP_N consecutive columns of ``s``. A score's rank
    in its group counts the members that beat it (higher, or equal and earlier): the tie rule of a
    stable descending sort."""
    g = tl.reshape(s, (R, C // GROUP_N, GROUP_N))
    idx = tl.arange(0, GROUP_N)
    earlier = idx[None, :] < idx[:, None]
    beats = (g[:, :, None, :] > g[:, :, :, None]) | (
        (g[:, :, None, :] == g[:, :, :, None]) & earlier[None, None, :, :]
    )
    rank = tl.sum(beats.to(tl.int32), axis=3)
    return tl.reshape(rank < GROUP_K, (R, C))


@triton.jit
def _residual_kernel(
    x_ptr,
    v_ptr,
    h_ptr,
    s_ptr,
    keep_ptr,
    sizes_ptr,
    stride_xb,
    stride_xm,
    stride_vb,
    stride_hb,
    stride_sb,
    np_,
    RANK: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
    GROUP_K: tl.constexpr,
    GROUP_N: tl.constexpr,
    WITH_MASK: tl.constexpr,
    ALONG_ROWS: tl.constexpr,
):
    """One ``[BM, BN]`` tile of one matrix. ``H``, ``S`` and ``keep`` rows have stride ``np_``."""
    pid_b = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_n = tl.program_id(2)
    m = tl.load(sizes_ptr + 2 * pid_b)
    n = tl.load(sizes_ptr + 2 * pid_b + 1)
    rows = pid_m * BM + tl.arange(0, BM)
    cols = pid_n * BN + tl.arange(0, BN)
    rk = tl.arange(0, RP)
    rmask = rows < m
    cmask = cols < n
    kmask = rk < RANK
    inside = rmask[:, None] & cmask[None, :]

    v = tl.load(
        v_ptr + pid_b * stride_vb + rows[:, None] * RANK + rk[None, :],
        mask=rmask[:, None] & kmask[None, :],
        other=0.0,
    )
    h = tl.load(
        h_ptr + pid_b * stride_hb + rk[:, None] * np_ + cols[None, :],
        mask=kmask[:, None] & cmask[None, :],
        other=0.0,
    )
    x = tl.load(x_ptr + pid_b * stride_xb + rows[:, None] * stride_xm + cols[None, :], mask=inside, other=0.0)
    s = tl.abs(x - tl.dot(v, h, input_precision="ieee"))
    s = tl.where(inside, s, 0.0)
    out = pid_b * stride_sb + rows[:, None] * np_ + cols[None, :]
    tl.store(s_ptr + out, s, mask=inside)

    if WITH_MASK:
        if ALONG_ROWS:
            keep = tl.trans(_group_keep(tl.trans(s), BN, BM, GROUP_K, GROUP_N))
        else:
            keep = _group_keep(s, BM, BN, GROUP_K, GROUP_N)
        tl.store(keep_ptr + out, keep.to(tl.int8), mask=inside)


def _launch(
    x: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    sizes: torch.Tensor,
    pattern: Pattern | None,
    along_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    b, mp, np_, rank = _check(x, v, h, sizes)
    x = x if x.stride(2) == 1 else x.contiguous()
    v, h = v.contiguous(), h.contiguous()
    s = torch.zeros(b, mp, np_, dtype=torch.float32, device=x.device)
    keep = torch.zeros(b, mp, np_, dtype=torch.int8, device=x.device) if pattern is not None else s
    group_n = pattern.n if pattern is not None else 1
    block_n = max(16, min(64, next_pow2(np_)))
    block_m = 32  # both tile sides are multiples of any fused group size (<= 16)
    grid = (b, triton.cdiv(mp, block_m), triton.cdiv(np_, block_n))
    if b:
        for_device(_residual_kernel, x)[grid](
            x,
            v,
            h,
            s,
            keep,
            sizes.contiguous(),
            x.stride(0),
            x.stride(1),
            v.stride(0),
            h.stride(0),
            s.stride(0),
            np_,
            RANK=rank,
            RP=max(16, next_pow2(rank)),
            BM=block_m,
            BN=block_n,
            GROUP_K=pattern.k if pattern is not None else 1,
            GROUP_N=group_n,
            WITH_MASK=pattern is not None,
            ALONG_ROWS=along_rows,
        )
    return s, (keep.bool() if pattern is not None else None)


def _fusable(pattern: Pattern) -> bool:
    return pattern.n <= _MAX_FUSED_GROUP and pattern.n == next_pow2(pattern.n)


def residual_triton(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    """Triton launcher of :func:`residual_ref`'s contract."""
    return _launch(x, v, h, sizes, None)[0]


def residual_nm_triton(
    x: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    sizes: torch.Tensor,
    pattern: str | Pattern,
    along_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher of :func:`residual_nm_ref`'s contract. Groups of up to 16 (a power of two) are
    selected inside the kernel; other patterns score in the kernel and select with ``nm_mask``."""
    pattern = Pattern.parse(pattern)
    _check_groups(sizes, pattern, along_rows)
    if not _fusable(pattern):
        s = residual_triton(x, v, h, sizes)
        return s, _nm_keep(s, sizes, pattern, along_rows)
    s, keep = _launch(x, v, h, sizes, pattern, along_rows)
    return s, keep


@torch.library.custom_op("knsparse::residual_scores", mutates_args=())
def _residual_op(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return residual_cpu(x, v, h, sizes)


@_residual_op.register_kernel("cuda")
def _residual_cuda(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return residual_triton(x, v, h, sizes)


@_residual_op.register_fake
def _residual_fake(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


@torch.library.custom_op("knsparse::residual_nm", mutates_args=())
def _residual_nm_op(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, k: int, n: int, along_rows: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_nm_ref(x, v, h, sizes, Pattern(k, n), along_rows)


@_residual_nm_op.register_kernel("cuda")
def _residual_nm_cuda(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, k: int, n: int, along_rows: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return residual_nm_triton(x, v, h, sizes, Pattern(k, n), along_rows)


@_residual_nm_op.register_fake
def _residual_nm_fake(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, k: int, n: int, along_rows: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(x), torch.empty(x.shape, dtype=torch.bool, device=x.device)


def residual_scores(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, in_place: bool = False
) -> torch.Tensor:
    """``|X - V H|`` for a bucket, ``[B, mp, np]`` float32, zero outside ``sizes``.

    ``in_place``: the caller no longer needs ``X``; on CPU (contiguous ``X``) the scores are written
    over it and ``X`` is returned, which saves allocating (and page-faulting) a bucket-sized tensor.
    """
    _check(x, v, h, sizes)
    sizes = sizes.to(x.device)
    if eager(x, v, h, sizes):
        if x.is_cuda:
            return residual_triton(x, v, h, sizes)
        return residual_cpu(x, v, h, sizes, out=x if in_place and x.is_contiguous() else None)
    return _residual_op(x, v, h, sizes)


def residual_nm_mask(
    x: torch.Tensor,
    v: torch.Tensor,
    h: torch.Tensor,
    sizes: torch.Tensor,
    pattern: str | Pattern,
    along_rows: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Scores as :func:`residual_scores` and the bool k:n mask of each matrix (groups of ``n``
    consecutive columns, or rows with ``along_rows``), False outside ``sizes``."""
    pattern = Pattern.parse(pattern)
    _check(x, v, h, sizes)
    _check_groups(sizes, pattern, along_rows)
    sizes = sizes.to(x.device)
    if eager(x, v, h, sizes):
        return (residual_nm_triton if x.is_cuda else residual_nm_ref)(x, v, h, sizes, pattern, along_rows)
    return _residual_nm_op(x, v, h, sizes, pattern.k, pattern.n, along_rows)
