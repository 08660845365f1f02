"""Random strict 2:4 weights for the knsparse-cuda tests."""

from __future__ import annotations

import torch

from knsparse.core.masks import nm_mask
from knsparse.core.pack import pack_24


def random_24(rows: int, depth: int, dtype: torch.dtype = torch.float16, seed: int = 0) -> torch.Tensor:
    """A dense 2:4 weight whose kept entries are all nonzero (|w| in [0.5, 1.5))."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, depth, generator=g) + 0.5
    w = w * torch.where(torch.rand(rows, depth, generator=g) < 0.5, -1.0, 1.0)
    return (w * nm_mask(torch.rand(rows, depth, generator=g), "2:4")).to(dtype)


def packed(
    rows: int, depth: int, dtype: torch.dtype = torch.float16, seed: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(values, meta)`` of :func:`random_24` as ``knsparse.pack_24`` writes them."""
    p = pack_24(random_24(rows, depth, dtype, seed))
    return p.values, p.meta
