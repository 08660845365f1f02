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

import torch

from ..pattern import Pattern

DAMP = 0.01
"""Default damping: 1% of the mean diagonal of ``H`` (SparseGPT's default)."""
BLOCKSIZE = 128
"""Columns per lazy-update block of the sweep (rounded down to a multiple of ``n``)."""


def damped(hessian: torch.Tensor, damp: float, name: str) -> torch.Tensor:
    """``H + damp · mean(diag H) · I`` in float64; ``ValueError`` naming layer ``name`` when the
    calibration inputs were all zero or ``damp`` is negative."""
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    h = hessian.double()
    mean_diag = float(h.diagonal().mean())
    if not mean_diag > 0:
        raise ValueError(f"layer {name!r}: the calibration inputs are all zero (empty Gram matrix)")
    return h + damp * mean_diag * torch.eye(h.shape[0], dtype=h.dtype, device=h.device)


def inverse_cholesky(h: torch.Tensor, name: str) -> torch.Tensor:
    """Upper Cholesky factor ``U`` of ``H⁻¹`` (``H⁻¹ = UᵀU``); ``ValueError`` naming the layer if
    ``H`` is not positive definite (raise ``damp``)."""
    lower, info = torch.linalg.cholesky_ex(h)
    if int(info):
        raise ValueError(f"layer {name!r}: the damped Gram matrix is not positive definite; raise damp")
    return torch.linalg.cholesky(torch.cholesky_inverse(lower), upper=True)


def _select(w: torch.Tensor, d: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """Kept entries of a slice ``w [out, c]``: the ``k`` of every ``n`` columns with the largest
    saliency ``w² / d²`` (``d`` = the diagonal of ``U`` over the slice's columns)."""
    saliency = w.square() / d.square()
    out, c = saliency.shape
    grouped = saliency.reshape(out, c // pattern.n, pattern.n)
    top = grouped.topk(pattern.k, dim=-1).indices
    keep = torch.zeros_like(grouped, dtype=torch.bool).scatter_(-1, top, True)
    return keep.reshape(out, c)


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
        ``(mask, new_weight)``: ``[out, K]`` bool, ``[out, K]`` float64 (zero where pruned).
    """
    w = weight.double().clone()
    u = hinv_u.double()
    out, k_dim = w.shape
    n = pattern.n
    blocksize = max(n, blocksize - blocksize % n)
    keep = torch.zeros(out, k_dim, dtype=torch.bool, device=w.device) if mask is None else mask.clone()
    for i1 in range(0, k_dim, blocksize):
        i2 = min(i1 + blocksize, k_dim)
        block, u_blk = w[:, i1:i2], u[i1:i2, i1:i2]
        err = torch.zeros_like(block)
        for j in range(i2 - i1):
            if mask is None and j % n == 0:
                cols = slice(j, j + n)
                keep[:, i1 + j : i1 + j + n] = _select(block[:, cols], u_blk.diagonal()[cols], pattern)
            col = block[:, j]
            e = torch.where(keep[:, i1 + j], 0.0, col / u_blk[j, j])
            block[:, j:] -= e.unsqueeze(1) * u_blk[j, j:].unsqueeze(0)
            err[:, j] = e
        w[:, i2:] -= err @ u[i1:i2, i2:]
    return keep, w * keep


def sparsegpt_sweep_ref(
    weight: torch.Tensor,
    hinv_u: torch.Tensor,
    pattern: Pattern,
    *,
    mask: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Plain twin of :func:`sparsegpt_sweep`: one column at a time, every OBS update applied to
    all remaining columns at once (no blocks)."""
    w = weight.double().clone()
    u = hinv_u.double()
    out, k_dim = w.shape
    n = pattern.n
    keep = torch.zeros(out, k_dim, dtype=torch.bool, device=w.device) if mask is None else mask.clone()
    for j in range(k_dim):
        if mask is None and j % n == 0:
            keep[:, j : j + n] = _select(w[:, j : j + n], u.diagonal()[j : j + n], pattern)
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


def relative_output_error(weight: torch.Tensor, new: torch.Tensor, hessian: torch.Tensor) -> float:
    """``Σ_i rᵢᵀ H rᵢ / Σ_i wᵢᵀ H wᵢ`` with ``r = weight − new``: the layer's output error on the
    calibration inputs relative to its output energy (0 = unchanged outputs)."""
    w, h = weight.double(), hessian.double()
    r = w - new.double()
    return float(((r @ h) * r).sum() / ((w @ h) * w).sum().clamp_min(1e-300))
