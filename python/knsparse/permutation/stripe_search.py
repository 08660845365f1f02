"""Column-permutation search maximising the score kept by k:n masking.

The columns of the search matrix are dealt into *stripes* of ``n`` consecutive columns; a
permutation only matters up to the order of columns inside a stripe and the order of the
stripes. :class:`StripeSearch` improves the stripes of one block with three kinds of move:

* **channel-swap rounds** — the gain of exchanging any column with any column of another
  stripe, all ``C x C`` at once. Replacing one column of a stripe changes its kept score by
  ``T - kept + relu(x - t)`` per row, where ``T`` / ``t`` are the kept sum / k-th largest of
  the other ``n - 1`` columns, so every swap is scored from one cached ``[C, C]`` table
  whose rows are recomputed only for the stripes that changed.
* **stripe-window rounds** — every canonical re-partition of the ``2n`` columns of two
  stripes into two new stripes (all of them while that is at most ``max_candidates``,
  otherwise exchanges of up to ``t >= 2`` columns), scored exactly for all stripe pairs in
  one batch; only pairs touching a changed stripe are rescored. (For ``n >= 12`` only single
  swaps would fit, which the swap rounds cover, so there are no window rounds.)
* **escapes** — from a local optimum, a tabu walk of swaps: the best swap that does not move
  a recently moved column is taken even when it loses score (tabu tenures are random), and
  the walk returns to the best permutation it met. Between walks a few random column swaps
  kick the search out of the basin it converged to.

Swap and window rounds apply the best moves greedily without letting two moves touch one
stripe. Matrices with more than ``block_stripes`` stripes are split into random blocks of
stripes that are searched one after another; each further pass draws new blocks, so columns
travel between all stripes. With ``segment`` (attention heads) blocks never cross segments.
Everything is seeded: a given seed, device and iteration budget always gives the same
permutation (a time budget can stop it earlier).
"""

from __future__ import annotations

import functools
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from itertools import combinations

import torch
from tqdm.auto import tqdm

from ..checks import check_device, check_flag, check_number, check_tensor
from ..masks import ConvOrder, check_conv_order
from ..pattern import Pattern
from .objective import efficacy, kept_score, optimal_kept, stacked_search_matrix, topk_sum

# Largest intermediate tensor (elements) a batched scoring step allocates.
_CHUNK_ELEMENTS = 1 << 23
# Largest swap-gain table (block columns^2 x rows) a block may need.
_BLOCK_TABLE_ELEMENTS = 1 << 28


@dataclass(frozen=True)
class SearchResult:
    """A column permutation and what it keeps.

    ``perm`` is ``[C]`` int64: column ``j`` of the permuted weight is column ``perm[j]`` of
    the original. Scores are sums of ``|w|`` (float64); ``steps`` counts the moves the method
    made beyond its greedy rounds (tabu steps; swaps for the baseline); ``seconds`` is
    wall-clock time.
    """

    perm: torch.Tensor
    kept: float
    kept_before: float
    kept_optimal: float
    efficacy: float
    steps: int
    seconds: float

    @classmethod
    def of(
        cls, matrix: torch.Tensor, pattern: Pattern, perm: torch.Tensor, steps: int, started: float
    ) -> SearchResult:
        """Score ``perm`` on the search matrix; ``started`` is the ``perf_counter`` at the start."""
        before, kept, optimal = (
            kept_score(matrix, pattern),
            kept_score(matrix, pattern, perm),
            optimal_kept(matrix, pattern),
        )
        return cls(
            perm, kept, before, optimal, efficacy(before, kept, optimal), steps, time.perf_counter() - started
        )


@functools.lru_cache(maxsize=16)
def window_candidates(n: int, max_candidates: int = 1000) -> torch.Tensor:
    """Re-partitions of two stripes (positions ``0..2n-1``) into two stripes of ``n``.

    Returns ``[P, 2n]`` int64: candidate ``c`` makes ``row[:n]`` the first new stripe and
    ``row[n:]`` the second. Row 0 is the identity. All canonical partitions (position 0 stays
    in the first stripe, so swapping whole stripes is not counted twice) when there are at
    most ``max_candidates`` of them; otherwise exchanges of ``1..t`` columns with the largest
    ``t`` that fits (at least single-column swaps). Cached: do not modify the result.
    """
    first_stripes: list[tuple[int, ...]] = []
    if math.comb(2 * n - 1, n - 1) <= max_candidates:
        first_stripes = [(0, *rest) for rest in combinations(range(1, 2 * n), n - 1)]
    else:
        first_stripes.append(tuple(range(n)))
        t = 1
        while t <= n // 2 and (t == 1 or len(first_stripes) + math.comb(n, t) ** 2 <= max_candidates):
            for out_a in combinations(range(n), t):
                for in_b in combinations(range(n, 2 * n), t):
                    first_stripes.append(tuple(i for i in range(n) if i not in out_a) + in_b)
            t += 1
    everything = frozenset(range(2 * n))
    seen: set[tuple[int, ...]] = set()
    rows = []
    for first in first_stripes:
        key = min(tuple(sorted(first)), tuple(sorted(everything - set(first))))
        if key not in seen:
            seen.add(key)
            rows.append(list(first) + sorted(everything - set(first)))
    return torch.tensor(rows, dtype=torch.long)


def greedy_matching(gain: torch.Tensor, tol: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Disjoint stripe pairs with gain above ``tol``, best first (greedy, vectorised).

    ``gain`` is a symmetric ``[G, G]`` matrix. Repeatedly takes every pair that is the best
    option of both its stripes — with ties broken towards the lower index such a pair always
    exists — which reproduces the sequential greedy matching. Returns ``(a, b)`` with ``a < b``.
    """
    g = gain.shape[0]
    idx = torch.arange(g, device=gain.device)
    w = gain.clone()
    w.fill_diagonal_(-math.inf)
    picked_a, picked_b = [], []
    while True:
        best, partner = w.max(dim=1)
        mutual = (best > tol) & (partner[partner] == idx) & (idx < partner)
        if not bool(mutual.any()):
            break
        a, b = idx[mutual], partner[mutual]
        picked_a.append(a)
        picked_b.append(b)
        used = torch.cat([a, b])
        w[used, :] = -math.inf
        w[:, used] = -math.inf
    if not picked_a:
        empty = torch.empty(0, dtype=torch.long, device=gain.device)
        return empty, empty
    return torch.cat(picked_a), torch.cat(picked_b)


class StripeSearch:
    """Search state over the stripes of one block ``[R, C]`` (``C`` a multiple of ``n``).

    ``cols[g]`` lists the columns of stripe ``g``; the caches below are kept consistent with
    it through :meth:`mark_changed`.
    """

    def __init__(
        self,
        matrix: torch.Tensor,
        pattern: Pattern,
        gen: torch.Generator,
        max_candidates: int,
        windows: bool = True,
    ) -> None:
        self.m = matrix
        self.mt = matrix.T.contiguous()
        self.pattern = pattern
        self.k, self.n = pattern.k, pattern.n
        channels = matrix.shape[1]
        self.g = channels // self.n
        device = matrix.device
        self.cols = torch.arange(channels, device=device).view(self.g, self.n)
        self.gen = gen
        self.tol = 1e-6 * float(matrix.sum()) / self.g
        positions = torch.arange(channels, device=device) // self.n
        self.same_stripe = positions[:, None] == positions[None, :]
        # delta[g, p, x]: change of stripe g's kept score if its p-th column were column x.
        self.delta = torch.zeros(self.g, self.n, channels, device=device)
        self.delta_dirty = torch.ones(self.g, dtype=torch.bool, device=device)
        # Window candidates that are single swaps only would repeat the swap rounds.
        cand = window_candidates(self.n, max_candidates)
        self.cand = cand.to(device) if windows and cand.shape[0] > 1 + self.n * self.n else None
        # Best window move per stripe pair; only entries marked fresh are up to date.
        self.pair_gain = torch.zeros(self.g, self.g, device=device)
        self.pair_choice = torch.zeros(self.g, self.g, dtype=torch.long, device=device)
        self.pair_fresh = torch.eye(self.g, dtype=torch.bool, device=device)
        self.tabu_steps = 0

    @property
    def perm(self) -> torch.Tensor:
        return self.cols.reshape(-1)

    def total(self) -> float:
        return kept_score(self.m, self.pattern, self.perm)

    def mark_changed(self, stripes: torch.Tensor) -> None:
        self.delta_dirty[stripes] = True
        self.pair_fresh[stripes, :] = False
        self.pair_fresh[:, stripes] = False
        self.pair_fresh[stripes, stripes] = True

    def restore(self, cols: torch.Tensor) -> None:
        changed = (self.cols != cols).any(dim=1).nonzero().flatten()
        self.cols = cols.clone()
        self.mark_changed(changed)

    # -- channel swaps -------------------------------------------------------------------
    def _refresh_delta(self) -> None:
        stripes = self.delta_dirty.nonzero().flatten()
        if stripes.numel() == 0:
            return
        rows, channels = self.m.shape
        vals = self.m[:, self.cols[stripes]]  # [R, u, n]
        ordered, order = vals.sort(dim=-1, descending=True, stable=True)
        kept = ordered[..., : self.k].sum(-1, keepdim=True)
        in_top = torch.zeros_like(vals, dtype=torch.bool).scatter_(-1, order[..., : self.k], True)
        kth, next_ = ordered[..., self.k - 1 : self.k], ordered[..., self.k : self.k + 1]
        # Kept sum and k-th largest of the stripe without the column at each position.
        rest_kept = torch.where(in_top, kept - vals + next_, kept)
        rest_kth = torch.where(in_top, next_, kth).reshape(rows, -1)
        base = (rest_kept - kept).sum(0).reshape(-1, 1)
        out = torch.empty(rest_kth.shape[1], channels, device=self.m.device)
        step = max(1, _CHUNK_ELEMENTS // (rows * channels))
        for s in range(0, rest_kth.shape[1], step):
            diff = self.m[:, None, :] - rest_kth[:, s : s + step, None]
            out[s : s + step] = diff.clamp_min_(0).sum(0)
        self.delta[stripes] = (out + base).view(-1, self.n, channels)
        self.delta_dirty[stripes] = False

    def swap_gains(self) -> torch.Tensor:
        """``[C, C]`` gain of swapping the columns at two positions (``-inf`` within a stripe)."""
        self._refresh_delta()
        by_pos = self.delta.view(self.g * self.n, -1)[:, self.perm]  # new column taken from a position
        return (by_pos + by_pos.T).masked_fill_(self.same_stripe, -math.inf)

    def _best_per_stripe_pair(self, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        g, n = self.g, self.n
        return gain.view(g, n, g, n).permute(0, 2, 1, 3).reshape(g, g, n * n).max(dim=-1)

    def _swap(self, a: torch.Tensor, b: torch.Tensor, move: torch.Tensor) -> torch.Tensor:
        """Swap position ``move // n`` of stripes ``a`` with position ``move % n`` of stripes
        ``b``; returns the moved column ids."""
        pa, pb = move // self.n, move % self.n
        col_a, col_b = self.cols[a, pa].clone(), self.cols[b, pb].clone()
        self.cols[a, pa], self.cols[b, pb] = col_b, col_a
        self.mark_changed(torch.cat([a, b]))
        return torch.cat([col_a, col_b])

    def swap_round(self) -> bool:
        """Apply the best disjoint improving column swaps; False when none gains."""
        best, move = self._best_per_stripe_pair(self.swap_gains())
        a, b = greedy_matching(best, self.tol)
        if a.numel() == 0:
            return False
        self._swap(a, b, move[a, b])
        return True

    # -- stripe windows ------------------------------------------------------------------
    def _score_pairs(self, a: torch.Tensor, b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best window gain and candidate for stripe pairs ``(a, b)``."""
        step = max(1, _CHUNK_ELEMENTS // (self.m.shape[0] * self.cand.numel()))
        gains, choices = [], []
        for s in range(0, a.numel(), step):
            cols = torch.cat([self.cols[a[s : s + step]], self.cols[b[s : s + step]]], dim=1)
            # Rows last keeps the reductions over a stripe's n columns contiguous.
            vals = self.mt[cols[:, self.cand]].unflatten(2, (2, self.n))  # [B, P, 2, n, R]
            kept = topk_sum(vals, self.k, dim=3).sum((2, 3))  # [B, P]
            best, choice = (kept - kept[:, :1]).max(dim=1)
            gains.append(best)
            choices.append(choice)
        return torch.cat(gains), torch.cat(choices)

    def window_round(self) -> bool:
        """Rescore the stale stripe pairs and apply the best disjoint re-partitions; False
        when none gains."""
        if self.cand is None:
            return False
        stale = torch.triu(~self.pair_fresh, diagonal=1).nonzero()
        if stale.shape[0]:
            a, b = stale[:, 0], stale[:, 1]
            gain, choice = self._score_pairs(a, b)
            self.pair_gain[a, b] = self.pair_gain[b, a] = gain
            self.pair_choice[a, b] = choice
            self.pair_fresh[a, b] = self.pair_fresh[b, a] = True
        a, b = greedy_matching(self.pair_gain, self.tol)
        if a.numel() == 0:
            return False
        cols = torch.cat([self.cols[a], self.cols[b]], dim=1)
        moved = cols.gather(1, self.cand[self.pair_choice[a, b]])
        self.cols[a], self.cols[b] = moved[:, : self.n], moved[:, self.n :]
        self.mark_changed(torch.cat([a, b]))
        return True

    # -- escapes -------------------------------------------------------------------------
    def tabu_walk(self, steps: int, deadline: float, tenure: tuple[int, int]) -> None:
        """Walk by single column swaps and end at the best permutation met (start included).

        Each step takes the best swap, unless it moves a tabu column without reaching a new
        best; then the best swap of non-tabu columns, even when it loses score. Moved columns
        stay tabu for a random number of steps in ``tenure`` (inclusive).
        """
        channels = self.m.shape[1]
        tabu_until = torch.zeros(channels, dtype=torch.long, device=self.m.device)
        current = best = self.total()
        best_cols = self.cols.clone()
        perm = self.perm
        touched: set[int] = set()
        for step in range(steps):
            if time.perf_counter() >= deadline:
                break
            self.tabu_steps += 1
            gain = self.swap_gains().view(-1)
            flat = int(gain.argmax())
            pos = divmod(flat, channels)
            aspires = float(gain[flat]) > best - current + self.tol
            if not aspires and bool((tabu_until[perm[list(pos)]] > step).any()):
                tabu = tabu_until[perm] > step
                gain = gain.view(channels, channels)
                gain[tabu] = -math.inf
                gain[:, tabu] = -math.inf
                flat = int(gain.argmax())
                pos = divmod(flat, channels)
                gain = gain.view(-1)
            value = float(gain[flat])
            if value == -math.inf:
                break
            current += value
            moved = perm[list(pos)]
            perm[list(pos)] = moved.flip(0)
            touched.update((pos[0] // self.n, pos[1] // self.n))
            self.delta_dirty[pos[0] // self.n] = self.delta_dirty[pos[1] // self.n] = True
            hold = torch.randint(tenure[0], tenure[1] + 1, (2,), generator=self.gen)
            tabu_until[moved] = step + 1 + hold.to(moved.device)
            if current > best + self.tol:
                current = self.total()  # resynchronise the running sum of float32 gains
                if current > best + self.tol:
                    best, best_cols = current, self.cols.clone()
        self.mark_changed(torch.tensor(sorted(touched), dtype=torch.long, device=self.m.device))
        self.restore(best_cols)

    def kick(self, swaps: int) -> None:
        """Swap one random column between each of ``swaps`` random disjoint stripe pairs."""
        swaps = min(swaps, self.g // 2)
        stripes = torch.randperm(self.g, generator=self.gen)[: 2 * swaps].to(self.cols.device)
        pos = torch.randint(self.n, (2, swaps), generator=self.gen).to(self.cols.device)
        a, b = stripes[:swaps], stripes[swaps:]
        col_a, col_b = self.cols[a, pos[0]].clone(), self.cols[b, pos[1]].clone()
        self.cols[a, pos[0]], self.cols[b, pos[1]] = col_b, col_a
        self.mark_changed(stripes)

    # -- driver --------------------------------------------------------------------------
    def local_search(self, deadline: float, windows: bool = True) -> None:
        """Swap rounds, then (if ``windows``) window rounds, until neither improves or time
        runs out."""
        while time.perf_counter() < deadline and (self.swap_round() or (windows and self.window_round())):
            pass

    def run(self, deadline: float, max_iters: int, walk: int, kick_swaps: int, first: bool) -> torch.Tensor:
        """Swap rounds; tabu walks, each started from the best permutation so far by a random
        kick, for ``max_iters`` tabu steps in all; then swap and window rounds from the best.
        Window rounds cost ``O(R * pairs * candidates)``, so they polish only at the end.
        ``first``: do one swap round even past the deadline. Returns ``cols``."""
        if self.g < 2:
            return self.cols
        if first:
            self.swap_round()
        self.local_search(deadline, windows=False)
        best, best_cols = self.total(), self.cols.clone()
        lo = max(2, self.g * self.n // 16)
        while self.tabu_steps < max_iters and time.perf_counter() < deadline:
            if self.tabu_steps:
                self.kick(kick_swaps)
            self.tabu_walk(min(walk, max_iters - self.tabu_steps), deadline, (lo, 2 * lo))
            total = self.total()
            if total > best + self.tol:
                best, best_cols = total, self.cols.clone()
            else:
                self.restore(best_cols)
        self.local_search(deadline)
        return self.cols


def search(
    weight: torch.Tensor | Sequence[torch.Tensor],
    pattern: str | Pattern,
    *,
    conv_order: ConvOrder = "rsc",
    names: Sequence[str] | None = None,
    seed: int = 0,
    time_budget_s: float | None = None,
    max_iters: int = 1000,
    passes: int = 1,
    block_stripes: int = 32,
    segment: int | None = None,
    walk: int = 200,
    kick_swaps: int = 2,
    max_candidates: int = 1000,
    windows: bool = True,
    device: torch.device | str | None = None,
    progress: bool = False,
) -> SearchResult:
    """Find an input-channel permutation that maximises the magnitude kept by k:n masking.

    Args:
        weight: a Linear ``[out, C]`` or Conv2d ``[Cout, C, R, S]`` weight, or several that
            share their ``C`` input channels (scored together). Magnitudes ``|w|`` are the
            scores, so nonnegative importance scores can be passed instead of weights.
        pattern: any k:n pattern (``"2:4"``, ``"6:12"``, ``"8:16"``, ...).
        conv_order: conv grouping; channel permutation needs ``"rsc"`` for kernels > 1x1.
        names: layer names for error messages.
        seed: seeds the blocks, tabu tenures and kicks.
        time_budget_s: wall-clock cap in seconds, checked between steps; one swap round on the
            first block always runs, so ``0`` gives a quick deterministic improvement.
            ``None``: no cap.
        max_iters: tabu steps per block and pass (0: greedy swap/window rounds only).
        passes: how many times the stripes are dealt into fresh random blocks.
        block_stripes: stripes searched together (``n * block_stripes`` columns); fewer for
            very tall matrices, so that ``(block columns)^2 * rows`` stays below 2^28.
        segment: confine the permutation to consecutive segments of this many columns
            (attention heads); a multiple of ``n`` dividing ``C``. ``None``: one segment.
        walk: tabu steps between two random kicks.
        kick_swaps: random column swaps per kick.
        max_candidates: window re-partitions scored per stripe pair.
        windows: run the stripe-window rounds. They score every pair of stripes of a block
            (``O(rows * stripes^2 * candidates)``); without them a search is swap rounds (and
            tabu steps) only, which on wide blocks of tall matrices keeps about as much for a
            fraction of the time (``bench/bench_permute.py --models``).
        device: where to search (default: the weight's device).
        progress: show a tqdm bar over the blocks.

    Returns:
        A :class:`SearchResult`; ``perm`` is on the weight's device.
    """
    start = time.perf_counter()
    pattern = Pattern.parse(pattern)
    for label, value, least in (
        ("max_iters", max_iters, 0),
        ("passes", passes, 1),
        ("block_stripes", block_stripes, 2),
        ("walk", walk, 0),
        ("kick_swaps", kick_swaps, 0),
        ("max_candidates", max_candidates, 1),
        ("seed", seed, None),
    ):
        check_number(value, label, low=least, integer=True)
    if segment is not None:
        check_number(segment, "segment", low=1, integer=True)
    if time_budget_s is not None:
        check_number(time_budget_s, "time_budget_s", low=0)
    check_flag(windows, "windows")
    check_conv_order(conv_order)
    check_flag(progress, "progress")
    if device is not None:
        device = check_device(device)
    weights = [weight] if isinstance(weight, torch.Tensor) else weight
    if isinstance(weights, str) or not isinstance(weights, Sequence):
        raise TypeError(f"weight must be a tensor or a sequence of tensors, got {type(weight).__name__}")
    for i, w in enumerate(weights):
        check_tensor(w, "weight" if weights is not weight else f"weight[{i}]", dims=(2, 4))
    if names is not None and (
        isinstance(names, str)
        or not isinstance(names, Sequence)
        or len(names) != len(weights)
        or not all(isinstance(n, str) for n in names)
    ):
        raise TypeError(f"names must be one str per weight ({len(weights)}), got {names!r}")
    matrix = stacked_search_matrix(weight, pattern, conv_order, names)
    out_device = matrix.device
    if device is not None:
        matrix = matrix.to(device)
    deadline = math.inf if time_budget_s is None else start + time_budget_s
    gen = torch.Generator(device="cpu").manual_seed(seed)
    stripes = matrix.shape[1] // pattern.n
    per_segment = stripes if segment is None else segment // pattern.n
    if segment is not None and (segment % pattern.n or matrix.shape[1] % segment or segment <= 0):
        raise ValueError(
            f"segment={segment} must be a positive multiple of n={pattern.n} "
            f"dividing the {matrix.shape[1]} channels"
        )
    cols = torch.arange(matrix.shape[1], device=matrix.device).view(stripes, pattern.n)
    # Tall matrices get narrower blocks: a swap-round table costs C_block^2 * R.
    widest = max(2, math.isqrt(_BLOCK_TABLE_ELEMENTS // matrix.shape[0]) // pattern.n)
    splits = math.ceil(per_segment / min(block_stripes, widest))
    regroup = splits > 1
    steps, searched = 0, False
    with tqdm(
        total=(passes if regroup else 1) * stripes // per_segment * splits,
        desc="permutation search",
        disable=not progress,
    ) as bar:
        for _ in range(passes if regroup else 1):
            for offset in range(0, stripes, per_segment):
                order = offset + (
                    torch.randperm(per_segment, generator=gen) if regroup else torch.arange(per_segment)
                )
                for block in order.tensor_split(splits):
                    bar.update()
                    first = not searched
                    if time.perf_counter() >= deadline and not first:
                        continue
                    searched = True
                    block = block.to(matrix.device)
                    block_cols = cols[block].reshape(-1)
                    state = StripeSearch(matrix[:, block_cols], pattern, gen, max_candidates, windows)
                    cols[block] = block_cols[state.run(deadline, max_iters, walk, kick_swaps, first)]
                    steps += state.tabu_steps
    result = SearchResult.of(matrix, pattern, cols.reshape(-1), steps, start)
    return replace(result, perm=result.perm.to(out_device))
