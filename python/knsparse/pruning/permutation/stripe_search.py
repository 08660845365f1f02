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
stripes; each further pass draws new blocks, so columns travel between all stripes. With
``segment`` (attention heads) blocks never cross segments. All blocks of one shape — from one
matrix or from many (:func:`search_matrices`, a whole model's channel groups) — are searched
in lockstep as one batch of tensor operations on the matrices' device; the tabu steps make no
host synchronisation. Everything is seeded per block: a given seed, device and iteration
budget always gives the same permutation, batched or not (a time budget can stop it earlier).
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

from ...core.checks import check_device, check_flag, check_number, check_tensor
from ...core.pattern import ConvOrder, Pattern
from .objective import efficacy, kept_and_kth_pair, kept_score, optimal_kept, stacked_search_matrix, topk_sum

# Largest intermediate tensor (elements) a batched scoring step allocates.
_CHUNK_ELEMENTS = 1 << 23
# Intermediate tensors (elements) of the memory-bound swap-gain passes: about 4 MiB, in cache.
_CACHE_ELEMENTS = 1 << 20
# Largest swap-gain table (block columns^2 x rows) a block may need.
_BLOCK_TABLE_ELEMENTS = 1 << 28
# Largest stack of blocks (blocks x rows x block columns) searched as one batch: on CPU one
# that leaves the batch's tables in the last-level cache (about 1.3x faster on ViT-B/16's MLP
# groups than 2^26), on an accelerator a large one.
_BATCH_ELEMENTS = 1 << 26
_CPU_BATCH_ELEMENTS = 1 << 22


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


def greedy_matching(gain: torch.Tensor, tol: torch.Tensor | float) -> tuple[torch.Tensor, ...]:
    """Disjoint stripe pairs with gain above ``tol``, best first (greedy, vectorised).

    ``gain`` is ``[B, G, G]``, symmetric per block; ``tol`` a float or ``[B]``. Repeatedly takes
    every pair that is the best option of both its stripes — with ties broken towards the lower
    index such a pair always exists — which reproduces the sequential greedy matching of each
    block. Returns ``(block, a, b)`` index tensors with ``a < b``.
    """
    blocks, g = gain.shape[0], gain.shape[1]
    idx = torch.arange(g, device=gain.device)
    tol = torch.as_tensor(tol, dtype=gain.dtype, device=gain.device).expand(blocks)[:, None]
    w = gain.clone()
    w.diagonal(dim1=1, dim2=2).fill_(-math.inf)
    picked: list[tuple[torch.Tensor, ...]] = []
    while True:
        best, partner = w.max(dim=2)
        mutual = (best > tol) & (partner.gather(1, partner) == idx) & (idx < partner)
        if not bool(mutual.any()):
            break
        bi, a = mutual.nonzero(as_tuple=True)
        b = partner[bi, a]
        picked.append((bi, a, b))
        for used in (a, b):
            w[bi, used, :] = -math.inf
            w[bi, :, used] = -math.inf
    if not picked:
        empty = torch.empty(0, dtype=torch.long, device=gain.device)
        return empty, empty, empty
    return tuple(torch.cat(parts) for parts in zip(*picked, strict=True))


def _argmax2d(
    table: torch.Tensor, row_offset: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Largest entry of every ``[B, C, C]`` ``table[b] + row_offset[b][:, None]`` and its
    position, the first in row-major order: ``(value, row, column)``, each ``[B]``. Row
    maxima first: much cheaper on CPU than an index-returning max over all ``C^2`` entries."""
    row_max = table.amax(dim=2)
    if row_offset is not None:
        row_max = row_max + row_offset
    value, row = row_max.max(dim=1)
    blocks = torch.arange(table.shape[0], device=table.device)
    return value, row, table[blocks, row].argmax(dim=1)


class StripeSearch:
    """Search state over the stripes of ``B`` independent blocks ``[B, R, C]`` (``C`` a
    multiple of ``n``), all searched in lockstep by batched tensor operations.

    ``cols[b, g]`` lists the columns of stripe ``g`` of block ``b``; the caches below are kept
    consistent with it through :meth:`mark_changed`. Block ``b`` draws its random numbers from
    ``gens[b]`` only, so a block's result does not depend on the blocks batched with it.
    """

    def __init__(
        self,
        matrices: torch.Tensor,
        pattern: Pattern,
        gens: Sequence[torch.Generator],
        max_candidates: int,
        windows: bool = True,
        transposed: torch.Tensor | None = None,
    ) -> None:
        """``transposed``: ``matrices.transpose(1, 2).contiguous()`` when the caller has it."""
        self.m = matrices
        self.mt = matrices.transpose(1, 2).contiguous() if transposed is None else transposed
        self.pattern = pattern
        self.k, self.n = pattern.k, pattern.n
        blocks, _, channels = matrices.shape
        self.g = channels // self.n
        device = matrices.device
        self.cols = torch.arange(channels, device=device).repeat(blocks, 1).view(blocks, self.g, self.n)
        self.gens = list(gens)
        self.tol = 1e-6 * matrices.sum((1, 2)) / self.g
        self.eye = torch.eye(self.g, dtype=torch.bool, device=device)
        # delta[b, g, p, x]: change of stripe g's kept score if its p-th column were column x
        # (-inf for x in stripe g).
        self.delta = torch.zeros(blocks, self.g, self.n, channels, device=device)
        self.delta_dirty = torch.ones(blocks, self.g, dtype=torch.bool, device=device)
        # Kept score of every stripe (float64), fresh where delta is.
        self.stripe_kept = torch.zeros(blocks, self.g, dtype=torch.float64, device=device)
        # Window candidates that are single swaps only would repeat the swap rounds.
        cand = window_candidates(self.n, max_candidates)
        self.cand = cand.to(device) if windows and cand.shape[0] > 1 + self.n * self.n else None
        # Best window move per stripe pair; only entries marked fresh are up to date.
        self.pair_gain = torch.zeros(blocks, self.g, self.g, device=device)
        self.pair_choice = torch.zeros(blocks, self.g, self.g, dtype=torch.long, device=device)
        self.pair_fresh = self.eye.repeat(blocks, 1, 1)
        self.tabu_steps = self.rounds = 0

    @property
    def perm(self) -> torch.Tensor:
        """``[B, C]`` view of :attr:`cols`."""
        return self.cols.view(self.cols.shape[0], -1)

    def totals(self) -> torch.Tensor:
        """``[B]`` float64 kept score of every block (as :func:`.objective.kept_score`)."""
        blocks, rows, channels = self.m.shape
        vals = self.m.gather(2, self.perm[:, None, :].expand(blocks, rows, channels))
        return topk_sum(vals.view(blocks, rows, self.g, self.n), self.k).double().sum((1, 2))

    def mark_changed(self, changed: torch.Tensor) -> None:
        """``changed``: ``[B, G]`` bool, the stripes whose columns changed."""
        self.delta_dirty |= changed
        self._stale_pairs(changed)

    def _stale_pairs(self, changed: torch.Tensor) -> None:
        self.pair_fresh &= ~(changed[:, :, None] | changed[:, None, :])
        self.pair_fresh |= self.eye

    def _changed(self, bi: torch.Tensor, stripes: torch.Tensor) -> torch.Tensor:
        mask = torch.zeros_like(self.delta_dirty)
        mask[bi, stripes] = True
        return mask

    def restore(self, cols: torch.Tensor) -> None:
        changed = (self.cols != cols).any(dim=2)
        self.cols = cols.clone()
        self.mark_changed(changed)

    # -- channel swaps -------------------------------------------------------------------
    def _refresh(self, blocks: torch.Tensor | None, stripes: torch.Tensor) -> None:
        """Recompute ``delta`` for ``stripes[i]`` ``[B', K]`` of block ``blocks[i]`` (``None``:
        every block; a stripe listed twice is recomputed twice).

        Without the column at position ``p`` the stripe's k-th largest in row ``r`` is the
        stripe's ``(k+1)``-th largest ``v1`` when ``p`` is among the top k there, else its k-th
        largest ``v0 >= v1``. So with ``E = relu(x - v1)`` a column ``x`` adds
        ``sum_r E - sum_{r: p not in top k} min(E, v0 - v1)``: two elementwise passes per
        stripe whatever ``n``, and one batched matrix product over the positions.
        """
        m = self.m if blocks is None else self.m[blocks]
        count, rows, channels = m.shape
        index = torch.arange(count, device=m.device) if blocks is None else blocks
        index = index[:, None].expand_as(stripes)
        vals = self.mt[index[..., None], self.cols[index, stripes]]  # [B', K, n, R]
        kept, kth, next_ = kept_and_kth_pair(vals, self.k, dim=2)  # [B', K, R]
        self.stripe_kept[index, stripes] = kept.double().sum(2)
        # Exactly the top k where kth > next_; on a tie the two cases below agree.
        outside = vals <= next_[:, :, None]
        # Change of the stripe's kept sum when the column at each position leaves it.
        base = (next_[:, :, None] - vals).masked_fill_(outside, 0.0).sum(3, keepdim=True)  # [B', K, n, 1]
        outside = outside.to(vals.dtype)
        next_, gap = next_[..., None], (kth - next_)[..., None]  # [B', K, R, 1]
        out = base.expand(-1, -1, -1, channels).contiguous()
        # On CPU the passes are memory-bound: chunks that stay in cache, broadcast, not copied.
        chunk = _CACHE_ELEMENTS if m.device.type == "cpu" else _CHUNK_ELEMENTS
        row_step = max(1, min(rows, chunk // channels))
        stripe_step = max(1, min(stripes.shape[1], chunk // (row_step * channels)))
        block_step = max(1, chunk // (stripe_step * row_step * channels))
        for b in range(0, count, block_step):
            bs = slice(b, b + block_step)
            for k in range(0, stripes.shape[1], stripe_step):
                ks = slice(k, k + stripe_step)
                for r in range(0, rows, row_step):
                    rs = slice(r, r + row_step)
                    excess = (m[bs, None, rs] - next_[bs, ks, rs]).clamp_min_(0)  # [b, k, rows, C]
                    out[bs, ks] += excess.sum(2, keepdim=True) - torch.matmul(
                        outside[bs, ks, :, rs], excess.clamp_max_(gap[bs, ks, rs])
                    )
        # A column cannot replace one of its own stripe: those entries are -inf.
        own = self.cols[index, stripes]  # [B', K, n]
        out.scatter_(3, own[:, :, None, :].expand(-1, -1, self.n, -1), -math.inf)
        self.delta[index, stripes] = out

    def _refresh_delta(self) -> None:
        """Recompute the stale stripes of ``delta`` (one host synchronisation)."""
        counts = self.delta_dirty.sum(1)
        most = int(counts.max())
        if most == 0:
            return
        blocks = None if bool((counts > 0).all()) else counts.nonzero().flatten()
        dirty = self.delta_dirty if blocks is None else self.delta_dirty[blocks]
        # Each block's stale stripes first; blocks with fewer recompute a few fresh ones too.
        stripes = (~dirty).to(torch.uint8).argsort(dim=1, stable=True)[:, :most]
        self._refresh(blocks, stripes)
        self.delta_dirty.zero_()

    def _by_position(self) -> torch.Tensor:
        """``[B, C, C]``: change of the stripe at position ``q`` if its column there were the
        column now at position ``p`` (``-inf`` when ``p`` is in the same stripe)."""
        blocks, channels = self.perm.shape
        return self.delta.view(blocks, channels, channels).gather(
            2, self.perm[:, None, :].expand(blocks, channels, channels)
        )

    def _gains(self) -> torch.Tensor:
        by_pos = self._by_position()
        return by_pos + by_pos.transpose(1, 2)

    def swap_gains(self) -> torch.Tensor:
        """``[B, C, C]`` gain of swapping the columns at two positions (``-inf`` within a stripe)."""
        self._refresh_delta()
        return self._gains()

    def _best_per_stripe_pair(self, gain: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b, g, n = gain.shape[0], self.g, self.n
        return gain.view(b, g, n, g, n).permute(0, 1, 3, 2, 4).reshape(b, g, g, n * n).max(dim=-1)

    def swap_round(self) -> bool:
        """Apply the best disjoint improving column swaps of every block; False when none gains."""
        best, move = self._best_per_stripe_pair(self.swap_gains())
        bi, a, b = greedy_matching(best, self.tol)
        if bi.numel() == 0:
            return False
        chosen = move[bi, a, b]
        pa, pb = chosen // self.n, chosen % self.n
        col_a, col_b = self.cols[bi, a, pa], self.cols[bi, b, pb]
        self.cols[bi, a, pa], self.cols[bi, b, pb] = col_b, col_a
        self.mark_changed(self._changed(torch.cat([bi, bi]), torch.cat([a, b])))
        return True

    # -- stripe windows ------------------------------------------------------------------
    def _score_pairs(
        self, bi: torch.Tensor, a: torch.Tensor, b: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Best window gain and candidate for stripe pairs ``(a, b)`` of blocks ``bi``."""
        step = max(1, _CHUNK_ELEMENTS // (self.m.shape[1] * self.cand.numel()))
        gains, choices = [], []
        for s in range(0, a.numel(), step):
            part = bi[s : s + step]
            cols = torch.cat([self.cols[part, a[s : s + step]], self.cols[part, b[s : s + step]]], dim=1)
            # Rows last keeps the reductions over a stripe's n columns contiguous.
            vals = self.mt[part[:, None, None], cols[:, self.cand]].unflatten(
                2, (2, self.n)
            )  # [B, P, 2, n, R]
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
        bi, a, b = torch.triu(~self.pair_fresh, diagonal=1).nonzero(as_tuple=True)
        if bi.numel():
            gain, choice = self._score_pairs(bi, a, b)
            self.pair_gain[bi, a, b] = self.pair_gain[bi, b, a] = gain
            self.pair_choice[bi, a, b] = choice
            self.pair_fresh[bi, a, b] = self.pair_fresh[bi, b, a] = True
        bi, a, b = greedy_matching(self.pair_gain, self.tol)
        if bi.numel() == 0:
            return False
        cols = torch.cat([self.cols[bi, a], self.cols[bi, b]], dim=1)
        moved = cols.gather(1, self.cand[self.pair_choice[bi, a, b]])
        self.cols[bi, a], self.cols[bi, b] = moved[:, : self.n], moved[:, self.n :]
        self.mark_changed(self._changed(torch.cat([bi, bi]), torch.cat([a, b])))
        return True

    # -- escapes -------------------------------------------------------------------------
    def tabu_walk(self, steps: int, deadline: float, tenure: tuple[int, int]) -> torch.Tensor:
        """Walk every block by single column swaps and end at the best permutation met (start
        included); tensor operations only, no host synchronisation per step. Returns the
        ``[B]`` float64 kept score of that permutation.

        Each step takes the best swap, unless it moves a tabu column without reaching a new
        best; then the best swap of non-tabu columns, even when it loses score. Moved columns
        stay tabu for a random number of steps in ``tenure`` (inclusive). A block with no
        allowed swap left stops. The walk keeps the swap gains by position and their transpose
        (:meth:`_by_position`) up to date, so a step costs the refresh of two stripes and a few
        passes over the ``[B, C, C]`` table.
        """
        blocks, channels = self.perm.shape
        device = self.m.device
        rows = torch.arange(blocks, device=device)
        tabu_until = torch.zeros(blocks, channels, dtype=torch.long, device=device)
        self._refresh_delta()
        current = self.stripe_kept.sum(1)
        best, best_cols = current.clone(), self.cols.clone()
        tol = self.tol.double()
        holds = torch.stack(
            [torch.randint(tenure[0], tenure[1] + 1, (steps, 2), generator=g) for g in self.gens], 1
        ).to(device)  # [steps, B, 2]
        active = torch.ones(blocks, dtype=torch.bool, device=device)
        touched = torch.zeros_like(self.delta_dirty)
        by_pos = self._by_position()
        by_pos_t = by_pos.transpose(1, 2).contiguous()
        stripe_positions = torch.arange(self.n, device=device)
        for step in range(steps):
            if time.perf_counter() >= deadline:
                break
            self.tabu_steps += 1
            gain = by_pos + by_pos_t
            value, p0, p1 = _argmax2d(gain)
            perm = self.perm
            tabu = tabu_until.gather(1, perm) > step  # by position
            hits = tabu[rows, p0] | tabu[rows, p1]
            penalty = torch.zeros(blocks, channels, device=device).masked_fill_(tabu, -math.inf)
            free_value, free_p0, free_p1 = _argmax2d(gain.add_(penalty[:, None, :]), penalty)
            fall_back = hits & ~(value.double() > best - current + tol)
            value = torch.where(fall_back, free_value, value)
            active &= value > -math.inf
            p0 = torch.where(active, torch.where(fall_back, free_p0, p0), 0)
            p1 = torch.where(active, torch.where(fall_back, free_p1, p1), 0)
            moved0, moved1 = perm[rows, p0], perm[rows, p1]
            perm[rows, p0], perm[rows, p1] = moved1, moved0
            moved_stripes = torch.stack([p0, p1], 1) // self.n
            self._refresh(None, moved_stripes)
            # The columns at p0 and p1 traded places; the two stripes' rows are new.
            by_pos[rows, :, p0], by_pos[rows, :, p1] = by_pos[rows, :, p1], by_pos[rows, :, p0]
            by_pos_t[rows, p0], by_pos_t[rows, p1] = by_pos_t[rows, p1], by_pos_t[rows, p0]
            fresh = self.delta[rows[:, None], moved_stripes].view(blocks, 2 * self.n, channels)
            fresh = fresh.gather(2, perm[:, None, :].expand(-1, 2 * self.n, -1))
            at = (moved_stripes[:, :, None] * self.n + stripe_positions).view(blocks, -1)
            by_pos[rows[:, None], at] = fresh
            by_pos_t[rows[:, None], :, at] = fresh
            touched[rows[:, None], moved_stripes] |= active[:, None]
            hold = step + 1 + holds[step]
            tabu_until[rows, moved0] = torch.where(active, hold[:, 0], tabu_until[rows, moved0])
            tabu_until[rows, moved1] = torch.where(active, hold[:, 1], tabu_until[rows, moved1])
            current = self.stripe_kept.sum(1)
            better = current > best + tol
            best = torch.where(better, current, best)
            best_cols = torch.where(better[:, None, None], self.cols, best_cols)
        self._stale_pairs(touched)  # their swap gains are up to date
        self.restore(best_cols)
        return best

    def kick(self, swaps: int) -> None:
        """Swap one random column between each of ``swaps`` random disjoint stripe pairs of
        every block."""
        swaps = min(swaps, self.g // 2)
        device = self.cols.device
        stripes = torch.stack([torch.randperm(self.g, generator=g)[: 2 * swaps] for g in self.gens]).to(
            device
        )
        pos = torch.stack([torch.randint(self.n, (2, swaps), generator=g) for g in self.gens]).to(device)
        bi = torch.arange(len(self.gens), device=device)[:, None].expand(-1, swaps)
        a, b = stripes[:, :swaps], stripes[:, swaps:]
        col_a, col_b = self.cols[bi, a, pos[:, 0]], self.cols[bi, b, pos[:, 1]]
        self.cols[bi, a, pos[:, 0]], self.cols[bi, b, pos[:, 1]] = col_b, col_a
        self.mark_changed(self._changed(torch.cat([bi, bi], 1), stripes))

    # -- driver --------------------------------------------------------------------------
    def local_search(self, deadline: float, windows: bool = True, max_rounds: float = math.inf) -> None:
        """Swap rounds, then (if ``windows``) window rounds, until neither improves, time runs
        out or ``max_rounds`` rounds (counted since the start of :meth:`run`) were made."""
        while (
            time.perf_counter() < deadline
            and self.rounds < max_rounds
            and (self.swap_round() or (windows and self.window_round()))
        ):
            self.rounds += 1

    def run(
        self, deadline: float, max_iters: int, walk: int, kick_swaps: int, max_rounds: float = math.inf
    ) -> torch.Tensor:
        """One swap round (even past the deadline); more swap rounds; tabu walks, each started
        from the best permutation so far by a random kick, for ``max_iters`` tabu steps in all;
        then swap and window rounds from the best, ``max_rounds`` improving rounds in all.
        Window rounds cost ``O(R * pairs * candidates)``, so they polish only at the end.
        Returns ``cols``."""
        if self.g < 2:
            return self.cols
        self.rounds = int(self.swap_round())
        self.local_search(deadline, windows=False, max_rounds=max_rounds)
        if max_iters == 0:
            self.local_search(deadline, max_rounds=max_rounds)
            return self.cols
        self._refresh_delta()
        best, best_cols = self.stripe_kept.sum(1), self.cols.clone()
        lo = max(2, self.g * self.n // 16)
        while self.tabu_steps < max_iters and time.perf_counter() < deadline:
            if self.tabu_steps:
                self.kick(kick_swaps)
            total = self.tabu_walk(min(walk, max_iters - self.tabu_steps), deadline, (lo, 2 * lo))
            better = total > best + self.tol.double()
            best = torch.where(better, total, best)
            best_cols = torch.where(better[:, None, None], self.cols, best_cols)
            self.restore(best_cols)
        self.local_search(deadline, max_rounds=max_rounds)
        return self.cols


def search(
    weight: torch.Tensor | Sequence[torch.Tensor],
    pattern: str | Pattern,
    *,
    conv_order: ConvOrder | None = None,
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
        pattern: any k:n pattern (``"2:4"``, ``"6:12"``, ``"8:16"``, ...); channel permutation
            needs the ``"rsc"`` conv order for kernels > 1x1.
        conv_order: the conv order, for a pattern given without one.
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
    pattern = Pattern.parse(pattern, conv_order)
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
    matrix = stacked_search_matrix(weight, pattern, names)
    out_device = matrix.device
    if device is not None:
        matrix = matrix.to(device)
    deadline = math.inf if time_budget_s is None else start + time_budget_s
    [(perm, steps)] = search_matrices(
        [matrix],
        pattern,
        segments=[segment],
        seed=seed,
        deadline=deadline,
        max_iters=max_iters,
        passes=passes,
        block_stripes=block_stripes,
        walk=walk,
        kick_swaps=kick_swaps,
        max_candidates=max_candidates,
        windows=windows,
        progress=progress,
    )
    result = SearchResult.of(matrix, pattern, perm, steps, start)
    return replace(result, perm=result.perm.to(out_device))


def _check_counts(max_iters: int | Sequence[int], passes: int, block_stripes: int) -> None:
    iters = [max_iters] if isinstance(max_iters, int) else list(max_iters)
    for label, value, least in (
        ("max_iters", min(iters, default=0), 0),
        ("passes", passes, 1),
        ("block_stripes", block_stripes, 2),
    ):
        if value < least:
            raise ValueError(f"{label} must be >= {least}, got {value}")


def _blocks(
    matrix: torch.Tensor, n: int, segment: int | None, block_stripes: int, gen: torch.Generator
) -> tuple[bool, list[torch.Tensor]]:
    """Whether ``matrix`` is split into several blocks (else one pass is enough) and this
    pass's blocks, ``[stripes]`` index tensors into its stripes, drawn from ``gen``."""
    stripes = matrix.shape[1] // n
    per_segment = stripes if segment is None else segment // n
    # Tall matrices get narrower blocks: a swap-round table costs C_block^2 * R.
    widest = max(2, math.isqrt(_BLOCK_TABLE_ELEMENTS // matrix.shape[0]) // n)
    splits = math.ceil(per_segment / min(block_stripes, widest))
    regroup = splits > 1
    blocks = []
    for offset in range(0, stripes, per_segment):
        order = offset + (
            torch.randperm(per_segment, generator=gen) if regroup else torch.arange(per_segment)
        )
        blocks.extend(order.tensor_split(splits))
    return regroup, blocks


def search_matrices(
    matrices: Sequence[torch.Tensor],
    pattern: Pattern,
    *,
    segments: Sequence[int | None] | None = None,
    seed: int = 0,
    deadline: float = math.inf,
    max_iters: int | Sequence[int] = 1000,
    passes: int = 1,
    block_stripes: int = 32,
    walk: int = 200,
    kick_swaps: int = 2,
    max_candidates: int = 1000,
    windows: bool | Sequence[bool] = True,
    max_rounds: float | Sequence[float] = math.inf,
    progress: bool = False,
) -> list[tuple[torch.Tensor, int]]:
    """:func:`search` of several search matrices ``[R_i, C_i]`` at once: blocks of the same
    shape and settings, from any of the matrices, are searched as one batch.

    Every matrix draws its blocks and every block its random numbers from generators seeded
    by ``seed`` alone, so a matrix gets the same permutation as when searched by itself (up to
    float rounding of batched reductions and the ``deadline``, a ``perf_counter`` value). Each
    batch always runs one swap round. ``max_iters`` (tabu steps per block and pass),
    ``windows`` and ``max_rounds`` (improving swap/window rounds per block and pass) may be
    given per matrix. Returns ``(perm [C_i] int64, tabu steps)`` per matrix.
    """
    count = len(matrices)
    segments = [None] * count if segments is None else list(segments)
    iters = [max_iters] * count if isinstance(max_iters, int) else list(max_iters)
    polish = [windows] * count if isinstance(windows, bool) else list(windows)
    rounds = list(max_rounds) if isinstance(max_rounds, Sequence) else [max_rounds] * count
    _check_counts(iters, passes, block_stripes)
    n = pattern.n
    for i, (m, segment) in enumerate(zip(matrices, segments, strict=True)):
        if m.shape[1] % n:
            raise ValueError(f"matrix {i}: {m.shape[1]} channels are not a multiple of n={n} for {pattern}")
        if segment is not None and (segment <= 0 or segment % n or m.shape[1] % segment):
            raise ValueError(
                f"segment={segment} must be a positive multiple of n={n} dividing the {m.shape[1]} channels"
            )
    gens = [torch.Generator(device="cpu").manual_seed(seed) for _ in matrices]
    cols = [torch.arange(m.shape[1], device=m.device).view(-1, n) for m in matrices]
    steps = [0] * count
    transposed: dict[int, torch.Tensor] = {}  # matrix index -> [C_i, R_i]
    for p in range(passes):
        # (rows, block width, tabu steps, windows, rounds, device) -> [(matrix, stripes, block seed)]
        batches: dict[tuple, list[tuple[int, torch.Tensor, int]]] = {}
        for i, m in enumerate(matrices):
            regroup, blocks = _blocks(m, n, segments[i], block_stripes, gens[i])
            if p and not regroup:
                continue
            for block in blocks:
                key = (m.shape[0], block.numel(), iters[i], polish[i], rounds[i], m.device)
                block_seed = int(torch.randint(2**62, (1,), generator=gens[i]))
                batches.setdefault(key, []).append((i, block.to(m.device), block_seed))
        for key, items in tqdm(
            batches.items(), desc=f"permutation search, pass {p + 1}", disable=not progress
        ):
            rows, width, block_iters, block_windows, block_rounds, _ = key
            cap = _CPU_BATCH_ELEMENTS if key[-1].type == "cpu" else _BATCH_ELEMENTS
            most = max(1, cap // (rows * width * n))
            for s in range(0, len(items), most):
                part = items[s : s + most]
                block_cols = [cols[i][block].reshape(-1) for i, block, _ in part]
                # Gathering rows of the transpose is a copy of contiguous rows, not a strided gather.
                for i, _, _ in part:
                    if i not in transposed:
                        transposed[i] = matrices[i].T.contiguous()
                mt = torch.stack([transposed[i][c] for (i, _, _), c in zip(part, block_cols, strict=True)])
                state = StripeSearch(
                    mt.transpose(1, 2).contiguous(),
                    pattern,
                    [torch.Generator(device="cpu").manual_seed(block_seed) for _, _, block_seed in part],
                    max_candidates,
                    block_windows,
                    transposed=mt,
                )
                found = state.run(deadline, block_iters, walk, kick_swaps, block_rounds).view(len(part), -1)
                for (i, block, _), c, local in zip(part, block_cols, found, strict=True):
                    cols[i][block] = c[local].view(-1, n)
                    steps[i] += state.tabu_steps
    return [(c.reshape(-1), s) for c, s in zip(cols, steps, strict=True)]
