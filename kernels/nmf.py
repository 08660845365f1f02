"""Batched nonnegative matrix factorisation by Lee–Seung multiplicative updates (Frobenius loss).

One call fits a whole batch of matrices ``X[b] ≈ V[b] @ H[b]`` (all layers of a model, or every
output channel of a layer). Ragged shapes travel as a zero-padded bucket plus ``sizes``:

* ``X``: ``[B, mp, np]`` float32, the matrices padded to a common shape;
* ``V0``: ``[B, mp, r]``, ``H0``: ``[B, r, np]`` float32, the initial factors;
* ``sizes``: ``[B, 2]`` int32, the real ``(m, n)`` of each matrix.

Entries outside ``sizes`` are ignored (masked) and come back as zeros, so padding never changes
the iterates. One iteration, with ``eps = 1e-8`` and fp32 accumulation:

    V <- V * (X H^T) / (V (H H^T) + eps)
    H <- H * (V^T X) / ((V^T V) H + eps)

The fused kernels do each iteration in one pass over ``X``: rows of ``V`` are updated block by
block with the current ``H``, and ``V^T X`` and ``V^T V`` for the ``H`` update are accumulated
from the same block of ``X`` right after, while it is still in cache. The iterates are those of
textbook MU (``V`` first, then ``H``, the order scikit-learn's ``solver="mu"`` uses).

Implementations with identical semantics:

* :func:`nmf_ref` — batched ``bmm``; the reference and the fallback;
* :func:`nmf_triton` — the Triton kernel, one program per matrix, all iterations in one launch;
* :func:`nmf_cpu` — the C twin (``nmf_cpu.c``) for CPUs; the reference where no compiler exists.

:func:`nmf_mu` is the public entry point (a ``torch.library`` custom op: Triton on CUDA, the C
twin on CPU, the reference where no C compiler is available).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .launch import eager, for_device, next_pow2
from .nmf_cpu import fit_native_

EPS = 1e-8


def check_nmf_inputs(
    x: torch.Tensor, v0: torch.Tensor, h0: torch.Tensor, sizes: torch.Tensor
) -> tuple[int, int, int, int]:
    """Validate a bucket; returns ``(B, mp, np, rank)``."""
    if x.dim() != 3:
        raise ValueError(f"X must be [B, mp, np], got shape {tuple(x.shape)}")
    b, mp, np_ = x.shape
    if v0.dim() != 3 or v0.shape[:2] != (b, mp):
        raise ValueError(f"V0 must be [B={b}, mp={mp}, r], got shape {tuple(v0.shape)}")
    rank = v0.shape[2]
    if rank < 1:
        raise ValueError("rank must be at least 1")
    if tuple(h0.shape) != (b, rank, np_):
        raise ValueError(f"H0 must be [B={b}, r={rank}, np={np_}], got shape {tuple(h0.shape)}")
    if tuple(sizes.shape) != (b, 2):
        raise ValueError(f"sizes must be [B={b}, 2], got shape {tuple(sizes.shape)}")
    for name, t in (("X", x), ("V0", v0), ("H0", h0)):
        if t.dtype != torch.float32:
            raise TypeError(f"{name} must be float32, got {t.dtype}")
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device}, X on {x.device}")
    if sizes.dtype != torch.int32:
        raise TypeError(f"sizes must be int32, got {sizes.dtype}")
    if b and (sizes.min() < 0 or (sizes[:, 0] > mp).any() or (sizes[:, 1] > np_).any()):
        raise ValueError(f"sizes must lie within the padded shape ({mp}, {np_})")
    return b, mp, np_, rank


def valid_masks(
    sizes: torch.Tensor, mp: int, np_: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Row mask ``[B, mp, 1]`` and column mask ``[B, 1, np]`` of the real entries."""
    sizes = sizes.to(device=device, dtype=torch.int64)
    rows = torch.arange(mp, device=device)[None, :, None] < sizes[:, 0, None, None]
    cols = torch.arange(np_, device=device)[None, None, :] < sizes[:, 1, None, None]
    return rows, cols


def masked_factors(
    v0: torch.Tensor, h0: torch.Tensor, sizes: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fresh contiguous copies of the initial factors with the padding zeroed."""
    rows, cols = valid_masks(sizes, v0.shape[1], h0.shape[2], v0.device)
    return (v0 * rows).contiguous(), (h0 * cols).contiguous()


def nmf_init(x: torch.Tensor, rank: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded initial factors for a stack ``x`` of ``[B, m, n]`` matrices (unpadded).

    Uniform ``[0, 1)`` entries scaled by ``sqrt(mean(X_b) / r)`` per matrix, so ``V0 H0`` has the
    scale of ``X_b``. Drawn on the CPU from ``generator`` so results do not depend on the device.
    Returns ``V0 [B, m, r]`` and ``H0 [B, r, n]`` on ``x.device``.
    """
    b, m, n = x.shape
    scale = (x.float().mean(dim=(1, 2)) / rank).sqrt().cpu()[:, None, None]
    v0 = torch.rand(b, m, rank, generator=generator) * scale
    h0 = torch.rand(b, rank, n, generator=generator) * scale
    return v0.to(x.device), h0.to(x.device)


def nmf_ref(
    x: torch.Tensor,
    v0: torch.Tensor,
    h0: torch.Tensor,
    sizes: torch.Tensor,
    iters: int = 200,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain-PyTorch reference: ``iters`` MU iterations for the whole bucket with batched ``bmm``.

    Returns the fitted ``V [B, mp, r]`` and ``H [B, r, np]``, zero outside ``sizes``.
    """
    b, mp, np_, rank = check_nmf_inputs(x, v0, h0, sizes)
    v, h = masked_factors(v0, h0, sizes)
    rows, cols = valid_masks(sizes, mp, np_, x.device)
    if not (bool(rows.all()) and bool(cols.all())):
        x = torch.where(rows & cols, x, 0.0)
    p, d = torch.empty_like(v), torch.empty_like(v)
    q, e = torch.empty_like(h), torch.empty_like(h)
    g = torch.empty(b, rank, rank, dtype=torch.float32, device=x.device)
    for _ in range(iters):
        torch.bmm(h, h.mT, out=g)
        torch.bmm(x, h.mT, out=p)
        torch.bmm(v, g, out=d)
        v.mul_(p.div_(d.add_(eps)))
        torch.bmm(v.mT, x, out=q)
        torch.bmm(v.mT, v, out=g)
        torch.bmm(g, h, out=e)
        h.mul_(q.div_(e.add_(eps)))
    return v, h


@triton.jit
def _nmf_mu_kernel(
    x_ptr,
    v_ptr,
    h_ptr,
    q_ptr,
    sizes_ptr,
    iters,
    eps,
    stride_xb,
    stride_xm,
    stride_vb,
    stride_hb,
    np_,
    RANK: tl.constexpr,
    RP: tl.constexpr,
    BM: tl.constexpr,
    BN: tl.constexpr,
):
    """One program fits one matrix for all ``iters`` iterations.

    ``V`` rows have stride ``RANK``; ``H`` and the ``V^T X`` scratch ``Q`` rows have stride ``np_``.
    The rank axis is padded to ``RP >= 16`` (``tl.dot``'s minimum) with masked, zero columns.
    """
    pid = tl.program_id(0)
    m = tl.load(sizes_ptr + 2 * pid)
    n = tl.load(sizes_ptr + 2 * pid + 1)
    x_ptr += pid * stride_xb
    v_ptr += pid * stride_vb
    h_ptr += pid * stride_hb
    q_ptr += pid * stride_hb
    rk = tl.arange(0, RP)
    kmask = rk < RANK
    rm = tl.arange(0, BM)
    rn = tl.arange(0, BN)

    g = tl.zeros((RP, RP), dtype=tl.float32)
    for n0 in range(0, n, BN):
        cols = n0 + rn
        hmask = kmask[:, None] & (cols < n)[None, :]
        h = tl.load(h_ptr + rk[:, None] * np_ + cols[None, :], mask=hmask, other=0.0)
        g += tl.dot(h, tl.trans(h), input_precision="ieee")

    for _ in range(iters):
        # Phase 1: V rows block by block; V^T X and V^T V accumulated from the same block of X.
        vv = tl.zeros((RP, RP), dtype=tl.float32)
        for m0 in range(0, m, BM):
            rows = m0 + rm
            rmask = rows < m
            p = tl.zeros((BM, RP), dtype=tl.float32)
            for n0 in range(0, n, BN):
                cols = n0 + rn
                cmask = cols < n
                x = tl.load(
                    x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                h = tl.load(
                    h_ptr + rk[:, None] * np_ + cols[None, :], mask=kmask[:, None] & cmask[None, :], other=0.0
                )
                p += tl.dot(x, tl.trans(h), input_precision="ieee")
            vptrs = v_ptr + rows[:, None] * RANK + rk[None, :]
            vmask = rmask[:, None] & kmask[None, :]
            v = tl.load(vptrs, mask=vmask, other=0.0)
            v = v * (p / (tl.dot(v, g, input_precision="ieee") + eps))
            tl.store(vptrs, v, mask=vmask)
            vv += tl.dot(tl.trans(v), v, input_precision="ieee")
            for n0 in range(0, n, BN):
                cols = n0 + rn
                cmask = cols < n
                x = tl.load(
                    x_ptr + rows[:, None] * stride_xm + cols[None, :],
                    mask=rmask[:, None] & cmask[None, :],
                    other=0.0,
                )
                qptrs = q_ptr + rk[:, None] * np_ + cols[None, :]
                qmask = kmask[:, None] & cmask[None, :]
                q = tl.load(qptrs, mask=qmask & (m0 > 0), other=0.0)
                q += tl.dot(tl.trans(v), x, input_precision="ieee")
                tl.store(qptrs, q, mask=qmask)
            tl.debug_barrier()
        # Phase 2: H column block by column block; H H^T for the next iteration on the way.
        g = tl.zeros((RP, RP), dtype=tl.float32)
        for n0 in range(0, n, BN):
            cols = n0 + rn
            hmask = kmask[:, None] & (cols < n)[None, :]
            hptrs = h_ptr + rk[:, None] * np_ + cols[None, :]
            h = tl.load(hptrs, mask=hmask, other=0.0)
            q = tl.load(q_ptr + rk[:, None] * np_ + cols[None, :], mask=hmask, other=0.0)
            h = h * (q / (tl.dot(vv, h, input_precision="ieee") + eps))
            tl.store(hptrs, h, mask=hmask)
            g += tl.dot(h, tl.trans(h), input_precision="ieee")
        tl.debug_barrier()


def nmf_triton(
    x: torch.Tensor,
    v0: torch.Tensor,
    h0: torch.Tensor,
    sizes: torch.Tensor,
    iters: int = 200,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Triton launcher, same contract as :func:`nmf_ref`. CPU tensors run under Triton's interpreter."""
    b, _, np_, rank = check_nmf_inputs(x, v0, h0, sizes)
    if x.stride(2) != 1:
        x = x.contiguous()
    v, h = masked_factors(v0, h0, sizes)
    if b == 0 or iters == 0:
        return v, h
    q = torch.empty_like(h)
    block_n = min(64, max(16, next_pow2(np_)))
    for_device(_nmf_mu_kernel, x)[(b,)](
        x,
        v,
        h,
        q,
        sizes.contiguous(),
        iters,
        eps,
        x.stride(0),
        x.stride(1),
        v.stride(0),
        h.stride(0),
        np_,
        RANK=rank,
        RP=max(16, next_pow2(rank)),
        BM=32,
        BN=block_n,
    )
    return v, h


def nmf_cpu(
    x: torch.Tensor,
    v0: torch.Tensor,
    h0: torch.Tensor,
    sizes: torch.Tensor,
    iters: int = 200,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """CPU launcher of the C twin, same contract as :func:`nmf_ref` (which it falls back to when no
    C compiler is available). The batch is split across ``torch.get_num_threads()`` threads."""
    check_nmf_inputs(x, v0, h0, sizes)
    if x.is_cuda:
        raise ValueError("nmf_cpu needs CPU tensors")
    v, h = masked_factors(v0, h0, sizes)
    if fit_native_(x.contiguous(), v, h, sizes.contiguous(), iters, eps):
        return v, h
    return nmf_ref(x, v0, h0, sizes, iters, eps)


@torch.library.custom_op("knsparse::nmf_mu", mutates_args=())
def _nmf_mu_op(
    x: torch.Tensor, v0: torch.Tensor, h0: torch.Tensor, sizes: torch.Tensor, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return nmf_cpu(x, v0, h0, sizes, iters, eps)


@_nmf_mu_op.register_kernel("cuda")
def _nmf_mu_cuda(
    x: torch.Tensor, v0: torch.Tensor, h0: torch.Tensor, sizes: torch.Tensor, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return nmf_triton(x, v0, h0, sizes, iters, eps)


@_nmf_mu_op.register_fake
def _nmf_mu_fake(
    x: torch.Tensor, v0: torch.Tensor, h0: torch.Tensor, sizes: torch.Tensor, iters: int, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    return torch.empty_like(v0), torch.empty_like(h0)


def nmf_mu(
    x: torch.Tensor,
    v0: torch.Tensor,
    h0: torch.Tensor,
    sizes: torch.Tensor,
    iters: int = 200,
    eps: float = EPS,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Fit a bucket (see the module docstring). Returns ``V [B, mp, r]``, ``H [B, r, np]``."""
    check_nmf_inputs(x, v0, h0, sizes)
    if iters < 0 or not math.isfinite(eps) or eps <= 0:
        raise ValueError(f"need iters >= 0 and eps > 0, got iters={iters}, eps={eps}")
    sizes = sizes.to(x.device)
    if eager(x, v0, h0, sizes):
        return (nmf_triton if x.is_cuda else nmf_cpu)(x, v0, h0, sizes, iters, eps)
    return _nmf_mu_op(x, v0, h0, sizes, iters, eps)
