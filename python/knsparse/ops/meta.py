"""CUTLASS 2:4 metadata layouts: the Ampere one ``knsparse.core.pack`` writes and the Hopper one.

Both hold the same 4-bit code per group of 4 (``idx0 | idx1 << 2``), four codes per 16-bit
unit covering 16 dense columns. Ampere (CUTLASS 2.x ``SparseGemm``) stores the units
``[rows, depth/16]`` reordered into ``ColumnMajorInterleaved<2>`` (``knsparse.core.pack``). Hopper
(CUTLASS 3.x ``Sm90GemmSparseConfig``, 16-bit inputs, threadblock K 128) stores them in
64-row x 128-column atoms; converting is a permutation of 16-bit units. The Hopper result is
uint8 (CUTLASS's ``ElementE``) so the two layouts can never be mixed up.
"""

from __future__ import annotations

import os

import torch

from ..core.pack import cutlass_meta_offsets
from .interop import ArrayLike, to_torch

ARCH_ENV = "KNSPARSE_CUDA_ARCH"
"""``KNSPARSE_CUDA_ARCH=80`` runs the Ampere kernels (their compute_80 PTX) on a Hopper GPU."""

# Must match KNSPARSE_SM90_META_BLOCK_K / _ROWS in csrc/knsparse_capi.h.
SM90_META_BLOCK_K = 128
SM90_META_BLOCK_ROWS = 64


def round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _sm90_meta_positions(rows: int, meta_cols: int) -> torch.Tensor:
    """Where CUTLASS's Hopper tensor-E layout stores 16-bit unit ``(m, u)``: int64 offsets in a
    ``[round_up(rows, 64), round_up(depth, 128) / 16]`` int16 buffer.

    ``Sm90GemmSparseConfig`` (16-bit inputs, MinTileShapeK = 128) builds its atom as
    ``make_ordered_layout(((8,2,4),(16,2,K/32)), ((3,1,5),(0,4,2)))`` over (row, dense column)
    and tiles atoms along rows first, then along columns. With ``m = m0 + 8 m1 + 16 m2 + 64 mb``
    and ``u = k1 + 2 k2 + 2 (K/32) kb`` the 16-bit unit lands at
    ``m1 + 2 k2 + 2n m0 + 16n k1 + 32n m2 + 128n mb + 2n rows_al kb`` with ``n = 128 / 32``.
    tests/ops/test_cutlass_meta.py checks this against CUTLASS's own layout object.
    """
    n = SM90_META_BLOCK_K // 32
    rows_al = round_up(rows, SM90_META_BLOCK_ROWS)
    m = torch.arange(rows).unsqueeze(1)
    u = torch.arange(meta_cols).unsqueeze(0)
    m0, m1, m2, mb = m % 8, (m // 8) % 2, (m // 16) % 4, m // 64
    k1, k2, kb = u % 2, (u // 2) % n, u // (2 * n)
    return m1 + 2 * k2 + 2 * n * m0 + 16 * n * k1 + 32 * n * m2 + 128 * n * mb + 2 * n * rows_al * kb


def sm90_meta_shape(rows: int, depth: int) -> tuple[int, int]:
    """Shape of the uint8 Hopper metadata of a ``[rows, depth]`` 2:4 weight."""
    return round_up(rows, SM90_META_BLOCK_ROWS), round_up(depth, SM90_META_BLOCK_K) // 8


def _check_pack_meta(meta: torch.Tensor) -> None:
    if meta.dtype != torch.int16 or meta.dim() != 2:
        raise TypeError(
            f"meta must be the int16 [rows, depth/16] tensor of knsparse.core.pack, got {meta.dtype} "
            f"{tuple(meta.shape)}"
        )
    if meta.shape[0] % 32:
        raise ValueError(f"meta has {meta.shape[0]} rows; the CUTLASS layout needs a multiple of 32")


def sm90_meta_from_sm80(meta: torch.Tensor) -> torch.Tensor:
    """Convert int16 ``[rows, depth/16]`` Ampere-layout metadata to the uint8 Hopper layout
    ``[round_up(rows, 64), round_up(depth, 128)/8]``; padding units are 0, as CUTLASS's own
    compressor leaves them."""
    _check_pack_meta(meta)
    rows, meta_cols = meta.shape
    shape = sm90_meta_shape(rows, meta_cols * 16)
    src = cutlass_meta_offsets(rows, meta_cols, 16, meta.device)
    dst = _sm90_meta_positions(rows, meta_cols).reshape(-1).to(meta.device)
    units = torch.zeros(shape[0] * shape[1] // 2, dtype=torch.int16, device=meta.device)
    units[dst] = meta.reshape(-1)[src]
    return units.view(torch.uint8).reshape(shape)


def sm80_meta_from_sm90(meta: torch.Tensor, rows: int, depth: int) -> torch.Tensor:
    """Inverse of :func:`sm90_meta_from_sm80` for a ``[rows, depth]`` weight."""
    if meta.dtype != torch.uint8 or tuple(meta.shape) != sm90_meta_shape(rows, depth):
        raise ValueError(
            f"expected uint8 Hopper metadata of shape {sm90_meta_shape(rows, depth)} for a "
            f"[{rows}, {depth}] weight, got {meta.dtype} {tuple(meta.shape)}"
        )
    meta_cols = depth // 16
    src = _sm90_meta_positions(rows, meta_cols).reshape(-1).to(meta.device)
    dst = cutlass_meta_offsets(rows, meta_cols, 16, meta.device)
    out = torch.empty(rows * meta_cols, dtype=torch.int16, device=meta.device)
    out[dst] = meta.contiguous().view(torch.int16).reshape(-1)[src]
    return out.reshape(rows, meta_cols)


def meta_arch(device: torch.device | str | int) -> str:
    """``"sm90"`` for compute capability 9.0 (unless ``KNSPARSE_CUDA_ARCH=80`` forces the
    Ampere kernels there), else ``"sm80"`` (8.x, and CPU for the reference)."""
    forced = os.environ.get(ARCH_ENV)
    if forced not in (None, "", "80", "90"):
        raise ValueError(f"{ARCH_ENV} must be 80 or 90, got {forced!r}")
    device = torch.device(device)
    if device.type == "cuda" and torch.cuda.get_device_capability(device) == (9, 0) and forced != "80":
        return "sm90"
    return "sm80"


def prepare_meta(meta: ArrayLike, arch: str | None = None) -> torch.Tensor:
    """The metadata :func:`sparse_gemm` wants on ``arch`` (default: the architecture of
    ``meta.device``): unchanged int16 for ``"sm80"``, uint8 Hopper layout for ``"sm90"``.

    ``meta`` is a torch tensor or a DLPack / CUDA-array-interface array; the result is a torch
    tensor (for ``"sm80"`` a view of ``meta``'s memory). Call once when a layer is built (after
    moving ``meta`` to its device), not per forward.
    """
    meta = to_torch(meta, "meta")
    arch = meta_arch(meta.device) if arch is None else arch
    if arch == "sm80":
        _check_pack_meta(meta)
        return meta
    if arch == "sm90":
        return sm90_meta_from_sm80(meta)
    raise ValueError(f"arch must be 'sm80' or 'sm90', got {arch!r}")
