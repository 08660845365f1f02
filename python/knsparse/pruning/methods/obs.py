"""Layer-wise reconstruction on the calibration Gram: the OBS column sweep of SparseGPT and the
exact least-squares re-fit of the kept weights inside a fixed mask.

Both minimise the layer's output error on the calibration inputs ``X`` (rows = GEMM input rows),
``‖(W − Ŵ) Xᵀ‖²_F = Σ_i (w_i − ŵ_i)ᵀ H (w_i − ŵ_i)`` with ``H = XᵀX`` (per sample), row by row,
with ``ŵ_i`` zero outside the mask. ``H`` is damped by ``λ = damp · mean(diag H)`` first
(``H + λI``: a ridge pulling the re-fitted weights toward the dense ones, and a positive
definite matrix even when calibration leaves directions unseen).

*SparseGPT* (Frantar & Alistarh, 2023) sweeps the columns left to right. At the first column of
every group of ``n`` it keeps the ``k`` entries per row with the largest OBS saliency
``w_j² / [H_F⁻¹]_jj`` (``F`` = the columns not yet swept, ``H_F⁻¹`` the inverse of ``H``
restricted to them); a pruned ``w_j`` is removed with the OBS update of the remaining columns,
``w_F −= (w_j / [H_F⁻¹]_jj) · [H_F⁻¹]_{j,F}``. Row ``j`` of the upper Cholesky factor ``U`` of
``H⁻¹`` (``H⁻¹ = UᵀU``) is ``[H_F⁻¹]_{j,F} / sqrt([H_F⁻¹]_jj)``, so one factorisation serves the
whole sweep. Updates inside a block of ``blocksize`` columns are applied column by column, the
block's accumulated update to the columns right of it as one matrix product (the "lazy batch"
trick): the same numbers as the column-by-column reference :func:`sparsegpt_sweep_ref`.
Every operation covers all rows at once; only columns are looped over.

*Least squares in a fixed mask* (:func:`refit_in_mask`): for row ``i`` with kept columns ``S``,
``ŵ_S = H_SS⁻¹ (H w_i)_S`` — the exact minimiser, solved for all rows as a batch of Cholesky
systems (rows grouped by their number of kept entries, chunked to bound memory).
"""

from __future__ import annotations

import math

import torch

from ...core.pattern import Pattern

DAMP = 0.01
"""Default damping: 1% of the mean diagonal of ``H`` (SparseGPT's default)."""
BLOCKSIZE = 128
"""Columns per lazy-update block of the sweep (rounded down to a multiple of ``n``)."""
REFIT_TOL = 1e-3
"""Conjugate-gradient re-fit: stop once an iteration removes less than this fraction of the
output error left (:func:`refit_in_mask_cg`)."""
REFIT_MAX_ITERS = 100
"""Conjugate-gradient re-fit: iteration cap."""
EXACT_REFIT_FLOPS = 2**31
""":func:`refit_kept_weights` solves exactly while the per-row Cholesky factorisations cost at
most this many flops (``out · s³ / 3``, ``s`` kept entries per row): about a second here, where
batched small factorisations run far below GEMM speed."""
REFIT_MIN_ROWS_PER_COLUMN = 1.0
"""A layer's kept weights are re-fitted only when its calibration saw at least this many GEMM
input rows per reduction column (``rows >= K``, so the Gram can have full rank). With fewer, the
least-squares problem inside the mask is underdetermined: the damping alone decides the unseen
directions, the solution is ill-conditioned (a condition number of ~1e5 at ``rows = K/8`` with 1%
damping), and an iterative solve stops at a point that depends on the Gram's rounding. Such a
layer keeps the weights of its mask rule (SparseGPT's sweep, or CAST's mask on the dense weights),
and the report says why (:func:`refit_too_thin`)."""


class UnusableGram(ValueError):
    """A layer's calibration Gram cannot drive a reconstruction (all-zero inputs, or not positive
    definite after damping). Methods fall back to a mask from their scorer and report why."""


def refit_too_thin(rows: int, k: int) -> str | None:
    """Why ``rows`` calibration rows are too few to re-fit a layer with ``K = k`` columns, or
    ``None`` when they are enough (:data:`REFIT_MIN_ROWS_PER_COLUMN`)."""
    need = math.ceil(REFIT_MIN_ROWS_PER_COLUMN * k)
    if rows >= need:
        return None
    return f"re-fit skipped: {rows} calibration rows for a {k}x{k} Gram (a re-fit needs {need})"


def damped(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` in float64 (SparseGPT's damping: a fraction of the mean
    diagonal); :class:`UnusableGram` naming layer ``name`` when the calibration inputs were all
    zero, ``ValueError`` when ``damp`` is negative."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = hessian.double()
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise UnusableGram(f"layer {name!r}: the calibration inputs are all zero (empty Gram matrix)")
    return h + damp * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def inverse_cholesky(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``); :class:`UnusableGram` naming the layer
    if ``H`` is not positive definite (raise ``damp``).

    One factorisation and one triangular inverse: the lower Cholesky factor of ``H`` with rows
    and columns reversed, reversed back, is an upper ``V`` with ``H = VVᵀ``, so
    ``H⁻¹ = V⁻ᵀV⁻¹`` and ``U = V⁻¹`` (upper, positive diagonal: the unique factor).
    """
    flipped, info = torch.linalg.cholesky_ex(h.flip(0, 1))
    if int(info):
        raise UnusableGram(f"layer {name!r}: the damped Gram matrix is not positive definite; raise damp")
    eye = torch.eye(h.shape[0], dtype=h.dtype, device=h.device)
    return torch.linalg.solve_triangular(flipped.flip(0, 1), eye, upper=True)


def _select(wt: torch.Tensor, d: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Kept entries of one group, given transposed: ``wt [n, out]`` (column ``j`` of the group is
    row ``j``), ``d [n]`` the diagonal of ``U`` over its columns. Keeps the ``k`` largest
    saliencies ``w² / d²`` of every output row, ties to the lower column (a stable sort).
    Returns ``[n, out]``."""
    sal = wt.square() / d.square().unsqueeze(1)
    order = sal.argsort(dim=0, descending=True, stable=True)
    return torch.zeros_like(wt, dtype=torch.bool).scatter_(0, order[: pattern.k], True)


def sparsegpt_sweep(
    weight: torch.Tensor,
    hinv_u: torch.Tensor,
    pattern: Pattern,
    *,
    mask: torch.Tensor | None = None,
    blocksize: int = BLOCKSIZE,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The SparseGPT sweep of one layer.

    Args:
        weight: ``[out, K]`` reduction view, ``K % n == 0``.
        hinv_u: ``[K, K]`` upper Cholesky factor of the damped ``H⁻¹`` (:func:`inverse_cholesky`).
        pattern: the k:n pattern (selection at the first column of every group).
        mask: ``[out, K]`` bool fixed mask instead of the saliency selection.
        blocksize: columns per lazy-update block (a multiple of ``n`` is used).

    Returns:
        ``(mask, new_weight)``: ``[out, K]`` bool and ``[out, K]`` (zero where pruned), computed
        in float64 for a float64 ``weight``, else in float32 (like SparseGPT's reference).
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    # Transposed ([K, out]) so that a column of the weight is a contiguous row.
    wt = weight.to(dtype).t().contiguous()
    u = hinv_u.to(dtype)
    k_dim = wt.shape[0]
    n = pattern.n
    blocksize = max(n, blocksize - blocksize % n)
    keep = torch.zeros_like(wt, dtype=torch.bool) if mask is None else mask.t().contiguous()
    # Two levels of lazy updates: a pruned column updates the rest of its group at once, the
    # group's errors update the rest of the block by one product, the block's the rest of the layer.
    for i1 in range(0, k_dim, blocksize):
        i2 = min(i1 + blocksize, k_dim)
        block, u_blk, keep_blk = wt[i1:i2], u[i1:i2, i1:i2], keep[i1:i2]
        err = torch.zeros_like(block)
        for g in range(0, i2 - i1, n):
            if mask is None:
                keep_blk[g : g + n] = _select(block[g : g + n], u_blk.diagonal()[g : g + n], pattern)
            for j in range(g, g + n):
                e = torch.where(keep_blk[j], 0.0, block[j] / u_blk[j, j])
                block[j : g + n].addr_(u_blk[j, j : g + n], e, alpha=-1)
                err[j] = e
            block[g + n :].addmm_(u_blk[g : g + n, g + n :].t(), err[g : g + n], alpha=-1)
        wt[i2:].addmm_(u[i1:i2, i2:].t(), err, alpha=-1)
    return keep.t(), (wt * keep).t()


def sparsegpt_sweep_ref(
    weight: torch.Tensor,
    hinv_u: torch.Tensor,
    pattern: Pattern,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain twin of :func:`sparsegpt_sweep`: one column at a time, every OBS update applied to
    all remaining columns at once (no blocks). Same precision rule."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w = weight.to(dtype).clone()
    u = hinv_u.to(dtype)
    out, k_dim = w.shape
    n = pattern.n
    keep = torch.zeros(out, k_dim, dtype=torch.bool, device=w.device) if mask is None else mask.clone()
    for j in range(k_dim):
        if mask is None and j % n == 0:
            keep[:, j : j + n] = _select(w[:, j : j + n].t(), u.diagonal()[j : j + n], pattern).t()
        e = torch.where(keep[:, j], 0.0, w[:, j] / u[j, j])
        w[:, j:] -= e.unsqueeze(1) * u[j, j:].unsqueeze(0)
    return keep, w * keep


def refit_in_mask(
    weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, *, max_bytes: int = 1 << 28
) -> torch.Tensor:
    """Least-squares re-fit of the kept weights: per row ``ŵ_S = H_SS⁻¹ (H w)_S``, zero elsewhere.

    Args:
        weight: ``[out, K]``.
        hessian: ``[K, K]`` symmetric positive definite (damped) Gram.
        mask: ``[out, K]`` bool, True = kept.
        max_bytes: memory bound of one batch of ``[rows, s, s]`` float64 systems.

    Returns:
        ``[out, K]`` float64 re-fitted weights, zero where ``mask`` is False.
    """
    w = weight.double()
    h = hessian.double()
    rhs_all = w @ h  # (H w_i) for every row, H symmetric
    new = torch.zeros_like(w)
    counts = mask.sum(1)
    for s in counts.unique().tolist():
        if s == 0:
            continue
        rows = (counts == s).nonzero().squeeze(1)
        chunk = max(1, max_bytes // (8 * s * s))
        for start in range(0, rows.numel(), chunk):
            r = rows[start : start + chunk]
            idx = mask[r].nonzero()[:, 1].reshape(-1, s)  # kept columns of each row, ascending
            h_ss = h[idx.unsqueeze(-1), idx.unsqueeze(-2)]  # [rows, s, s]
            rhs = rhs_all[r.unsqueeze(1), idx].unsqueeze(-1)
            sol = torch.cholesky_solve(rhs, torch.linalg.cholesky(h_ss)).squeeze(-1)
            new[r.unsqueeze(1), idx] = sol
    return new


def refit_in_mask_cg(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    mask: torch.Tensor,
    start: torch.Tensor | None = None,
    *,
    tol: float = REFIT_TOL,
    max_iters: int = REFIT_MAX_ITERS,
) -> torch.Tensor:
    """The minimiser of :func:`refit_in_mask` by conjugate gradients on all rows at once.

    Each row is its own system ``H_SS ŵ_S = (H w)_S``; the rows share every product: one
    ``[out, K] × [K, K]`` GEMM per iteration (``(M ⊙ P) H``, masked), Jacobi-preconditioned by
    ``diag H``, with per-row step sizes. An iteration lowers the output error
    ``Σ_i (w_i − ŵ_i)ᵀ H (w_i − ŵ_i)`` by ``Σ_i α_i r_iᵀz_i`` exactly, so the loop stops when one
    lowered it by less than ``tol`` times what is left, or after ``max_iters`` iterations.
    No Python loop over rows, no ``[rows, s, s]`` systems: the cost of a few layer GEMMs.

    Args:
        weight: ``[out, K]`` dense weights.
        hessian: ``[K, K]`` symmetric positive definite (damped) Gram.
        mask: ``[out, K]`` bool, True = kept.
        start: ``[out, K]`` first guess (e.g. SparseGPT's swept weights); default ``weight``.
            Only its kept entries are used.
        tol: relative error decrease below which the iteration stops.
        max_iters: iteration cap.

    Returns:
        ``[out, K]`` float32 re-fitted weights, zero where ``mask`` is False.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    h = hessian.to(dtype)
    w = weight.to(dtype)
    keep = mask.to(dtype)
    x = (weight if start is None else start).to(dtype) * keep
    gap = w - x
    full = gap @ h
    left = float((full * gap).sum())  # output error Σ (w − x)ᵀ H (w − x) of the first guess
    r = full * keep  # minus half the gradient, inside the mask
    jacobi = h.diagonal().reciprocal()
    z = r * jacobi
    p = z.clone()
    rz = (r * z).sum(1)
    for _ in range(max_iters):
        q = (p @ h) * keep
        curvature = (p * q).sum(1)
        alpha = torch.where(curvature > 0, rz / curvature, torch.zeros_like(rz))
        x.addcmul_(alpha.unsqueeze(1), p)
        r.addcmul_(alpha.unsqueeze(1), q, value=-1)
        lowered = float((alpha * rz).sum())
        left -= lowered
        if lowered <= tol * max(left, 0.0):
            break
        z = r * jacobi
        rz_next = (r * z).sum(1)
        beta = torch.where(rz > 0, rz_next / rz, torch.zeros_like(rz))
        p = z.addcmul_(beta.unsqueeze(1), p)
        rz = rz_next
    return (x * keep).float()


def refit_kept_weights(
    weight: torch.Tensor, hessian: torch.Tensor, mask: torch.Tensor, start: torch.Tensor | None = None
) -> torch.Tensor:
    """The least-squares re-fit of the kept weights inside ``mask``, ``[out, K]`` float32.

    Small layers get the exact per-row solve (:func:`refit_in_mask`, up to ``EXACT_REFIT_FLOPS``):
    no tolerance, and the same answer for Grams that differ only by summation order (as when
    several processes calibrate), even when few calibration rows leave the Gram ill-conditioned.
    Larger layers get conjugate gradients from ``start`` (:func:`refit_in_mask_cg`), whose
    cost grows with ``out · K²`` per iteration instead of ``out · s³``.
    """
    kept = int(mask.sum(1).max()) if mask.numel() else 0
    if weight.shape[0] * kept**3 / 3 <= EXACT_REFIT_FLOPS:
        return refit_in_mask(weight, hessian, mask).float()
    return refit_in_mask_cg(weight, hessian, mask, start)


def relative_output_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """``Σ_i rᵢᵀ H rᵢ / Σ_i wᵢᵀ H wᵢ`` with ``r = weight − new``: the layer's output error on the
    calibration inputs relative to its output energy (0 = unchanged outputs). A report figure:
    the products run in float32 (float64 for float64 inputs), the sums in float64."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w, h = weight.to(dtype), hessian.to(dtype)
    r = w - new.to(dtype)
    error = ((r @ h) * r).sum(dtype=torch.float64)
    return float(error / ((w @ h) * w).sum(dtype=torch.float64).clamp_min(1e-300))
