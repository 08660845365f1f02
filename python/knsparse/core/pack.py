"""Exact 2:4 packing into the CUTLASS sparse-GEMM layout.

A 2:4 weight ``[m, k]`` is stored as ``values [m, k/2]`` (the two kept entries of every group
of four, in index order) and ``meta``: a 2-bit in-group index per kept entry, four bits per
group. For fp16/bf16 an int16 meta word covers 4 groups (16 columns), for int8 an int32 word
covers 8 groups (32 columns). CUTLASS reads the meta matrix ``[m, k/16]`` (or ``[m, k/32]``)
in its ``ColumnMajorInterleaved<2>`` layout, after rows are interleaved inside blocks of
32 (16 for int8) and the off-diagonal entries of every 2x2 block are swapped. The result is
bit-exact with ``torch.sparse._semi_structured_conversions.sparse_semi_structured_from_dense_cutlass``
for strict 2:4 input.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .checks import check_tensor
from .compress import kept_slots
from .masks import check_finite

# dtype -> (meta dtype, meta bits, min rows, min cols): CUTLASS sparse GEMM constraints.
_LAYOUT: dict[torch.dtype, tuple[torch.dtype, int, int, int]] = {
    torch.float16: (torch.int16, 16, 32, 64),
    torch.bfloat16: (torch.int16, 16, 32, 64),
    torch.int8: (torch.int32, 32, 16, 128),
}


@dataclass(frozen=True)
class Packed24:
    """A packed 2:4 matrix.

    Attributes:
        values: ``[M, K/2]`` kept entries, ``M x K`` the padded shape.
        meta: ``[M, K/16]`` int16 (fp16/bf16) or ``[M, K/32]`` int32 (int8), CUTLASS layout.
        shape: the logical (unpadded) shape ``(m, k)``.
    """

    values: torch.Tensor
    meta: torch.Tensor
    shape: tuple[int, int]

    @property
    def dtype(self) -> torch.dtype:
        return self.values.dtype

    @property
    def padded_shape(self) -> tuple[int, int]:
        return (self.values.shape[0], self.values.shape[1] * 2)

    def to(self, device: torch.device | str) -> Packed24:
        return Packed24(self.values.to(device), self.meta.to(device), self.shape)


def min_shape(dtype: torch.dtype) -> tuple[int, int]:
    """Row and column multiples the CUTLASS sparse GEMM needs for ``dtype``."""
    _check_dtype(dtype)
    return _LAYOUT[dtype][2], _LAYOUT[dtype][3]


def _check_dtype(dtype: torch.dtype) -> None:
    if dtype not in _LAYOUT:
        raise ValueError(
            f"w: 2:4 packing supports float16, bfloat16 and int8, got {dtype}; cast the weight first"
        )


def cutlass_meta_offsets(rows: int, meta_cols: int, meta_bits: int, device: torch.device) -> torch.Tensor:
    """Flat destination offset, in the CUTLASS meta buffer, of every logical meta word ``(r, c)``."""
    block, spread = (32, 4) if meta_bits == 16 else (16, 2)
    r = torch.arange(rows, device=device).unsqueeze(1).expand(rows, meta_cols)
    c = torch.arange(meta_cols, device=device).unsqueeze(0).expand(rows, meta_cols)
    # Row interleave inside each block: rows 8 apart become neighbours.
    r = r - r % block + (r % 8) * spread + (r % block) // 8
    # Transpose every 2x2 block: the two entries whose row and column parities differ swap.
    flip = (r ^ c) & 1
    r, c = r ^ flip, c ^ flip
    # Column-major with pairs of columns interleaved.
    return ((c // 2) * rows * 2 + r * 2 + c % 2).reshape(-1)


def _describe_bad_groups(counts: torch.Tensor, what: str) -> str:
    bad = (counts > 2).nonzero()
    row, grp = bad[0].tolist()
    return (
        f"{what} is not 2:4: {len(bad)} of {counts.numel()} groups of 4 hold more than 2 "
        f"nonzeros; the first is row {row}, columns {4 * grp}..{4 * grp + 3}"
    )


def check_24(w: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Validate a 2:4 weight ``[m, k]`` and return the bool ``[m, k]`` of its kept slots.

    Raises ``ValueError`` for non-2-D input, an unsupported dtype, NaN/Inf, a mask of the
    wrong shape or with nonzeros of ``w`` outside it, and groups breaking 2:4 (with the count
    and the first offender).
    """
    check_tensor(w, "w", floating=False, dims=(2,))
    if mask is not None:
        check_tensor(mask, "mask", floating=False)
    _check_dtype(w.dtype)
    m, k = w.shape
    if k % 4:
        raise ValueError(f"weight of shape {(m, k)}: k={k} is not a multiple of 4, so it cannot be 2:4")
    if mask is not None and mask.shape != w.shape:
        raise ValueError(f"mask shape {tuple(mask.shape)} != weight shape {(m, k)}")
    present = (w != 0) if mask is None else mask.to(torch.bool)
    if torch.compiler.is_compiling():
        # A compiled graph cannot raise on values; what it packs is a sparse layer's weight,
        # k:n by construction, whose values were checked when they were stored or loaded.
        return present
    check_finite(w, "pack_24")
    if mask is not None:
        outside = ((w != 0) & ~present).sum().item()
        if outside:
            raise ValueError(f"weight has {outside} nonzeros outside the mask; apply the mask first")
    counts = present.reshape(m, k // 4, 4).sum(-1)
    if (counts > 2).any():
        raise ValueError(_describe_bad_groups(counts, "mask" if mask is not None else "weight"))
    return present


def pack_24(w: torch.Tensor, mask: torch.Tensor | None = None, pad: bool = False) -> Packed24:
    """Pack a 2:4 weight ``[m, k]`` (fp16, bf16 or int8) into values + CUTLASS metadata.

    Args:
        w: the weight; every group of 4 along ``k`` must hold at most 2 nonzeros.
        mask: optional bool ``[m, k]`` of the kept slots (at most 2 per group; ``w`` must be
            zero outside it). Without it the nonzeros of ``w`` are the kept slots.
        pad: zero-pad ``m``/``k`` up to the CUTLASS multiples (32/64 for fp16/bf16, 16/128 for
            int8) instead of refusing the shape.

    Raises:
        ValueError: non-2-D input, unsupported dtype, NaN/Inf, a group breaking 2:4 (with the
            count and the first offender), or a shape off the CUTLASS multiples without ``pad``.
    """
    if not isinstance(pad, bool):
        raise TypeError(f"pad must be a bool, got {type(pad).__name__}")
    present = check_24(w, mask)
    m, k = w.shape
    meta_dtype, meta_bits, row_mult, col_mult = _LAYOUT[w.dtype]
    pad_m, pad_k = -m % row_mult, -k % col_mult
    if (pad_m or pad_k) and not pad:
        raise ValueError(
            f"weight of shape {(m, k)} ({w.dtype}) is off the CUTLASS sparse GEMM multiples "
            f"(rows % {row_mult}, cols % {col_mult}); pass pad=True to zero-pad it"
        )
    if pad_m or pad_k:
        w = torch.nn.functional.pad(w, (0, pad_k, 0, pad_m))
        present = torch.nn.functional.pad(present, (0, pad_k, 0, pad_m))
    rows, cols = w.shape
    groups = w.reshape(rows, cols // 4, 4)
    lo, hi = kept_slots(present.reshape(rows, cols // 4, 4), 2).unbind(-1)
    values = torch.stack((groups.gather(-1, lo.unsqueeze(-1)), groups.gather(-1, hi.unsqueeze(-1))), -1)
    values = values.reshape(rows, cols // 2)

    nibbles = (lo | (hi << 2)).reshape(rows, -1, meta_bits // 4)
    shifts = torch.arange(0, meta_bits, 4, device=w.device)
    words = (nibbles << shifts).sum(-1)  # int64; reinterpreted as the signed meta type below
    words = torch.where(words >= 2 ** (meta_bits - 1), words - 2**meta_bits, words).to(meta_dtype)
    meta = torch.empty(words.numel(), dtype=meta_dtype, device=w.device)
    meta[cutlass_meta_offsets(rows, words.shape[1], meta_bits, w.device)] = words.reshape(-1)
    return Packed24(values.contiguous(), meta.reshape(rows, -1), (m, k))


def unpack_24(p: Packed24) -> torch.Tensor:
    """The dense ``[m, k]`` matrix of a :class:`Packed24` (exact inverse of :func:`pack_24`).

    Raises ``ValueError`` naming ``p`` for values/meta of inconsistent dtypes or shapes, and for
    metadata whose group names the same slot twice or out of order (a corrupted meta word, which
    would otherwise silently drop one of the group's two values).
    """
    _check_packed(p)
    rows, cols = p.padded_shape
    meta_bits = p.meta.element_size() * 8
    flat = p.meta.reshape(-1)[cutlass_meta_offsets(rows, p.meta.shape[1], meta_bits, p.meta.device)]
    words = flat.to(torch.int64) & (2**meta_bits - 1)
    shifts = torch.arange(0, meta_bits, 4, device=words.device)
    nibbles = ((words.reshape(rows, -1, 1) >> shifts) & 0xF).reshape(rows, cols // 4)
    lo, hi = nibbles & 3, nibbles >> 2
    if (lo >= hi).any():
        row, group = (lo >= hi).nonzero()[0].tolist()
        raise ValueError(
            f"p.meta is corrupted: {int((lo >= hi).sum())} groups name slots that are not two distinct "
            f"ascending positions (first: row {row}, columns {4 * group}..{4 * group + 3}, "
            f"slots {int(lo[row, group])}, {int(hi[row, group])})"
        )
    dense = torch.zeros(rows, cols // 4, 4, dtype=p.values.dtype, device=p.values.device)
    vals = p.values.reshape(rows, cols // 4, 2)
    dense.scatter_(-1, lo.unsqueeze(-1), vals[..., :1])
    dense.scatter_(-1, hi.unsqueeze(-1), vals[..., 1:])
    m, k = p.shape
    return dense.reshape(rows, cols)[:m, :k]


def _check_packed(p: object) -> None:
    """``TypeError``/``ValueError`` naming ``p`` unless its parts fit together."""
    if not isinstance(p, Packed24):
        raise TypeError(f"p must be a Packed24 (from pack_24), got {type(p).__name__}")
    check_tensor(p.values, "p.values", floating=False, dims=(2,))
    check_tensor(p.meta, "p.meta", floating=False, dims=(2,))
    _check_dtype(p.values.dtype)
    meta_dtype, meta_bits = _LAYOUT[p.values.dtype][:2]
    rows, cols = p.padded_shape
    if p.meta.dtype != meta_dtype or p.meta.shape != (rows, cols // meta_bits):
        raise ValueError(
            f"p.meta must be {meta_dtype} of shape {(rows, cols // meta_bits)} for {p.values.dtype} "
            f"values of shape {tuple(p.values.shape)}, got {p.meta.dtype} {tuple(p.meta.shape)}"
        )
    if cols % meta_bits or rows % (32 if meta_bits == 16 else 16):
        raise ValueError(f"p.values shape {tuple(p.values.shape)} is off the CUTLASS multiples")
    m, k = p.shape
    if not (0 < m <= rows and 0 < k <= cols):
        raise ValueError(f"p.shape {p.shape} does not fit the padded shape {(rows, cols)}")
