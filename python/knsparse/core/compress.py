"""Compressed k:n storage for any pattern: the kept values and their in-group slot indices.

A k:n matrix ``[rows, K]`` (reduction view, see :mod:`knsparse.core.masks`) is stored as
``values [rows, K/n*k]`` and ``slots [rows, K/n*k]`` (uint8, the position of each kept value
inside its group of ``n``, ascending). This is what the modules keep on disk; backends turn
it into their own operand (dense masked weight, CUTLASS 2:4 values + metadata, ...).
"""

from __future__ import annotations

import torch

from .masks import check_groupable, from_reduction_view, nm_violation, to_reduction_view
from .pattern import Pattern


def kept_slots(present: torch.Tensor, k: int) -> torch.Tensor:
    """Slot indices ``[..., k]`` (ascending) to store for groups ``present [..., n]`` (bool).

    Groups must hold at most ``k`` True. Groups with fewer are filled with their lowest-index
    empty slots, which hold zeros, so storage stays exact.
    """
    n = present.shape[-1]
    # Present slots sort first (in index order), then empty ones (in index order).
    key = (~present).to(torch.int64) * n + torch.arange(n, device=present.device)
    return torch.sort(torch.sort(key, dim=-1).values[..., :k] % n, dim=-1).values


def compress_nm(
    weight: torch.Tensor,
    mask: torch.Tensor,
    pattern: Pattern,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, slots)`` of ``weight * mask`` for a k:n bool ``mask`` of the weight's shape.

    Raises ``ValueError`` naming the layer when the pattern cannot tile the weight or a group of
    the mask keeps more than ``k``."""
    check_groupable(weight.shape, pattern, name)
    violation = nm_violation(mask, pattern)
    if violation:
        raise ValueError(f"{f'layer {name!r}' if name else 'weight'}: {violation}")
    w2 = to_reduction_view(weight * mask, pattern.conv_order)
    present = to_reduction_view(mask, pattern.conv_order).reshape(w2.shape[0], -1, pattern.n)
    slots = kept_slots(present, pattern.k)
    values = w2.reshape(present.shape).gather(-1, slots)
    return values.reshape(w2.shape[0], -1).contiguous(), slots.reshape(w2.shape[0], -1).to(torch.uint8)


def decompress_nm(
    values: torch.Tensor,
    slots: torch.Tensor,
    shape: torch.Size | tuple[int, ...],
    pattern: Pattern,
) -> torch.Tensor:
    """The dense weight of ``shape`` (zeros at the pruned entries)."""
    rows = values.shape[0]
    dense = torch.zeros(
        rows, values.shape[1] // pattern.k, pattern.n, dtype=values.dtype, device=values.device
    )
    dense.scatter_(-1, slots.long().reshape(rows, -1, pattern.k), values.reshape(rows, -1, pattern.k))
    return from_reduction_view(dense.reshape(rows, -1), shape, pattern.conv_order)
