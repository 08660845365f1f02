"""The reference point for the search: a plain greedy channel-swap search.

This is the channel-swap strategy of apex ASP's permutation search (TETRIS adapted to k:n),
written from its description: every iteration scores *every* swap of two columns in
different stripes from scratch, applies the single best one, and stops when no swap gains.
No caching, no parallel moves, no escapes — the benchmark measures knsparse against it in
the same run.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from ..masks import ConvOrder
from ..pattern import Pattern
from .objective import stacked_search_matrix, topk_sum
from .stripe_search import SearchResult


def greedy_swap_search(
    weight: torch.Tensor | Sequence[torch.Tensor],
    pattern: str | Pattern,
    *,
    conv_order: ConvOrder = "rsc",
    max_swaps: int = 100_000,
) -> SearchResult:
    """Best-single-swap hill climbing on the same objective as :func:`~.stripe_search.search`."""
    start = time.perf_counter()
    pattern = Pattern.parse(pattern)
    m = stacked_search_matrix(weight, pattern, conv_order)
    channels, n, k = m.shape[1], pattern.n, pattern.k
    perm = torch.arange(channels, device=m.device)
    i, j = torch.triu_indices(channels, channels, offset=1, device=m.device)
    keep = i // n != j // n
    i, j = i[keep], j[keep]
    tol = 1e-6 * float(m.sum()) / (channels // n)
    swaps = 0
    while swaps < max_swaps:
        stripes = perm.view(-1, n)
        cols_a, cols_b = stripes[i // n].clone(), stripes[j // n].clone()
        old = topk_sum(m[:, cols_a], k).sum(0) + topk_sum(m[:, cols_b], k).sum(0)
        rows = torch.arange(i.numel(), device=m.device)
        cols_a[rows, i % n], cols_b[rows, j % n] = perm[j], perm[i]
        gain = topk_sum(m[:, cols_a], k).sum(0) + topk_sum(m[:, cols_b], k).sum(0) - old
        best = int(gain.argmax())
        if float(gain[best]) <= tol:
            break
        a, b = int(i[best]), int(j[best])
        perm[[a, b]] = perm[[b, a]]
        swaps += 1
    return SearchResult.of(m, pattern, perm, swaps, start)
