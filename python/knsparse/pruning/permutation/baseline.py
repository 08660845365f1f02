"""The reference point for the search: a plain greedy channel-swap search.

This is the channel-swap strategy of apex ASP's permutation search (TETRIS adapted to k:n),
written from its description: every iteration scores *every* swap of two columns in
different stripes from scratch, applies the single best one, and stops when no swap gains.
No caching, no parallel moves, no escapes — the benchmark measures knsparse against it in
the same run. :func:`greedy_groups` runs it on a whole model's channel groups (the groups,
scaling and efficacy of :func:`~.apply.permute`), with a wall-clock cap per group.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ...core.layers import placement_reasons, shared_tensors
from ...core.pattern import ConvOrder, Pattern
from .apply import GroupReport, find_groups, judge_group, placement_skip, prepare_group, scaled_stack
from .objective import stacked_search_matrix, topk_sum
from .stripe_search import SearchResult


def greedy_swap_search(
    weight: torch.Tensor | Sequence[torch.Tensor],
    pattern: str | Pattern,
    *,
    conv_order: ConvOrder | None = None,
    max_swaps: int = 100_000,
    segment: int | None = None,
    time_budget_s: float | None = None,
) -> SearchResult:
    """Best-single-swap hill climbing on the same objective as :func:`~.stripe_search.search`.

    ``segment``: only swaps inside consecutive segments of this many channels (attention
    heads). ``time_budget_s``: stop after the first swap that ends past this many seconds
    (``None``: run until no swap gains). Swaps are scored in chunks of at most 2^23
    elements, which changes the memory, not the search.
    """
    start = time.perf_counter()
    deadline = math.inf if time_budget_s is None else start + time_budget_s
    pattern = Pattern.parse(pattern, conv_order)
    m = stacked_search_matrix(weight, pattern)
    channels, n, k = m.shape[1], pattern.n, pattern.k
    perm = torch.arange(channels, device=m.device)
    i, j = torch.triu_indices(channels, channels, offset=1, device=m.device)
    keep = (i // n != j // n) & (i // (segment or channels) == j // (segment or channels))
    i, j = i[keep], j[keep]
    tol = 1e-6 * float(m.sum()) / (channels // n)
    step = max(1, (1 << 23) // (m.shape[0] * n))
    swaps = 0
    while swaps < max_swaps and time.perf_counter() < deadline:
        stripes = perm.view(-1, n)
        gain = torch.cat(
            [
                _swap_gains(m, stripes, perm, i[s : s + step], j[s : s + step], k)
                for s in range(0, i.numel(), step)
            ]
        )
        best = int(gain.argmax())
        if float(gain[best]) <= tol:
            break
        a, b = int(i[best]), int(j[best])
        perm[[a, b]] = perm[[b, a]]
        swaps += 1
    return SearchResult.of(m, pattern, perm, swaps, start)


def _swap_gains(
    m: torch.Tensor, stripes: torch.Tensor, perm: torch.Tensor, i: torch.Tensor, j: torch.Tensor, k: int
) -> torch.Tensor:
    """Gain of swapping the columns at positions ``i[p]`` and ``j[p]``, scored from scratch."""
    n = stripes.shape[1]
    cols_a, cols_b = stripes[i // n].clone(), stripes[j // n].clone()
    old = topk_sum(m[:, cols_a], k).sum(0) + topk_sum(m[:, cols_b], k).sum(0)
    rows = torch.arange(i.numel(), device=m.device)
    cols_a[rows, i % n], cols_b[rows, j % n] = perm[j], perm[i]
    return topk_sum(m[:, cols_a], k).sum(0) + topk_sum(m[:, cols_b], k).sum(0) - old


@dataclass
class BaselineGroup:
    """The greedy baseline on one channel group: ``report`` as :func:`~.apply.permute` would
    write it (``efficacy`` on the same scale), ``swaps`` made, ``seconds`` wall-clock, and
    ``capped`` when the time cap stopped it before no swap gained."""

    report: GroupReport
    rows: int
    swaps: int
    seconds: float
    capped: bool


def greedy_groups(
    model: nn.Module,
    pattern: str | Pattern,
    *,
    names: Sequence[str] | None = None,
    time_budget_s: float | None = 10.0,
    conv_order: ConvOrder | None = None,
) -> list[BaselineGroup]:
    """:func:`greedy_swap_search` on the channel groups :func:`~.apply.permute` searches
    (``names``: only the groups of these names, ``None``: all), each with ``time_budget_s``
    seconds (``None``: to convergence). The model is not changed."""
    pattern = Pattern.parse(pattern, conv_order)
    placement, shared = placement_reasons(model), shared_tensors(model)
    out = []
    for group in find_groups(model).groups:
        if names is not None and group.name not in names:
            continue
        report = GroupReport(group.name, group.consumers, group.source)
        report.skip_reason = group.skip_reason or placement_skip(model, group, placement, shared)
        matrices = None if report.skip_reason else prepare_group(model, group, report, pattern)
        if matrices is None:
            continue
        stacked = scaled_stack(matrices, pattern)
        result = greedy_swap_search(stacked, pattern, segment=group.block, time_budget_s=time_budget_s)
        capped = time_budget_s is not None and result.seconds >= time_budget_s
        judge_group(matrices, result.perm, report, pattern)
        report.seconds = result.seconds
        out.append(BaselineGroup(report, stacked.shape[0], result.steps, result.seconds, capped))
    return out
