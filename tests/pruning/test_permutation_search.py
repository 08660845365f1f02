"""Permutation search: objective, move scoring against brute force, and the full search."""

import math
import time
from itertools import combinations

import pytest
import torch

from knsparse.core.masks import nm_mask
from knsparse.core.pattern import Pattern
from knsparse.pruning.permutation import search
from knsparse.pruning.permutation.apply import split_budget
from knsparse.pruning.permutation.baseline import greedy_groups, greedy_swap_search
from knsparse.pruning.permutation.objective import (
    efficacy,
    kept_and_kth_pair,
    kept_score,
    optimal_kept,
    search_matrix,
    topk_sum,
)
from knsparse.pruning.permutation.stripe_search import (
    StripeSearch,
    _argmax2d,
    greedy_matching,
    search_matrices,
    window_candidates,
)


def _rand(*shape: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _kept_by_mask(w: torch.Tensor, pattern: str) -> float:
    """Kept magnitude computed independently through knsparse.core.masks.nm_mask."""
    return float((w.abs() * nm_mask(w.abs(), pattern)).double().sum())


@pytest.mark.parametrize(("k", "n"), [(2, 4), (1, 4), (3, 4), (6, 12), (8, 16), (12, 16)])
def test_topk_sum_matches_sort(k: int, n: int) -> None:
    x = _rand(5, 7, n)
    want = x.sort(dim=-1, descending=True).values[..., :k].sum(-1)
    torch.testing.assert_close(topk_sum(x, k), want)
    torch.testing.assert_close(topk_sum(x.transpose(1, 2), k, dim=1), want)


@pytest.mark.parametrize(("k", "n"), [(2, 4), (1, 4), (3, 4), (3, 8), (6, 12)])
def test_kept_and_kth_pair_match_sort(k: int, n: int) -> None:
    x = _rand(5, n, 7)
    top = x.sort(dim=1, descending=True).values
    kept, kth, next_ = kept_and_kth_pair(x, k, dim=1)
    torch.testing.assert_close(kept, top[:, :k].sum(1))
    assert torch.equal(kth, top[:, k - 1]) and torch.equal(next_, top[:, k])
    if (k, n) == (2, 4):  # the min/max network keeps topk_sum's exact value
        assert torch.equal(kept, topk_sum(x, k, dim=1))


def test_argmax2d_is_the_first_flat_maximum() -> None:
    gen = torch.Generator().manual_seed(7)
    table = torch.randint(0, 4, (6, 9, 9), generator=gen).float()  # many ties
    table[table == 0] = -math.inf
    table[5] = -math.inf  # a block with nothing allowed
    offset = torch.randint(0, 2, (6, 9), generator=gen).float()
    offset[offset == 0] = -math.inf
    for extra in (None, offset):
        value, row, col = _argmax2d(table, extra)
        full = table if extra is None else table + extra[:, :, None]
        want_value = full.view(6, -1).amax(dim=1)
        assert torch.equal(value, want_value)
        for b in range(5):
            first = int((full[b].reshape(-1) == want_value[b]).nonzero()[0])
            assert (int(row[b]), int(col[b])) == divmod(first, 9)


def test_kept_score_and_efficacy_match_masks() -> None:
    w = _rand(16, 32)
    perm = torch.randperm(32, generator=torch.Generator().manual_seed(1))
    m = search_matrix(w)
    assert kept_score(m, Pattern(2, 4), perm) == pytest.approx(_kept_by_mask(w[:, perm], "2:4"), rel=1e-6)
    optimum = float(w.abs().sort(dim=1, descending=True).values[:, :16].double().sum())
    assert optimal_kept(m, Pattern(2, 4)) == pytest.approx(optimum, rel=1e-6)
    assert efficacy(10.0, 12.0, 14.0) == pytest.approx(0.5)
    assert efficacy(10.0, 10.0, 10.0) == 1.0


def test_conv_search_matrix_rows_are_kernel_positions() -> None:
    w = _rand(3, 8, 2, 2)
    m = search_matrix(w)
    assert m.shape == (12, 8)
    torch.testing.assert_close(m[1 * 4 + 1 * 2 + 0], w[1, :, 1, 0].abs())


def test_window_candidates_are_the_canonical_partitions() -> None:
    cand = window_candidates(4)
    assert cand.shape == (35, 8)
    assert cand[0].tolist() == list(range(8))
    keys = {min(tuple(sorted(r[:4])), tuple(sorted(r[4:]))) for r in cand.tolist()}
    assert len(keys) == 35
    assert all(sorted(r) == list(range(8)) for r in cand.tolist())
    # Too many partitions for n=8 and 16: exchanges of up to 2 resp. 1 columns.
    assert window_candidates(8).shape == (1 + 64 + 28 * 28, 16)
    assert window_candidates(16).shape == (1 + 256, 32)


def _sequential_greedy(gain: torch.Tensor, tol: float) -> set[tuple[int, int]]:
    g = gain.shape[0]
    edges = sorted(((float(gain[i, j]), i, j) for i in range(g) for j in range(i + 1, g)), reverse=True)
    used: set[int] = set()
    out = set()
    for value, i, j in edges:
        if value > tol and i not in used and j not in used:
            out.add((i, j))
            used |= {i, j}
    return out


@pytest.mark.parametrize("seed", range(5))
def test_greedy_matching_equals_sequential_greedy(seed: int) -> None:
    x = _rand(12, 12, seed=seed)
    gain = x + x.T
    other = _rand(12, 12, seed=seed + 10)
    bi, a, b = greedy_matching(torch.stack([gain, other + other.T]), tol=0.0)
    assert set(zip(a[bi == 0].tolist(), b[bi == 0].tolist(), strict=True)) == _sequential_greedy(gain, 0.0)
    assert set(zip(a[bi == 1].tolist(), b[bi == 1].tolist(), strict=True)) == _sequential_greedy(
        other + other.T, 0.0
    )


@pytest.mark.parametrize("pattern", ["2:4", "3:8", "1:4"])
def test_swap_gains_match_brute_force(pattern: str) -> None:
    p = Pattern.parse(pattern)
    m = _rand(6, 3 * p.n, seed=3).abs()
    state = StripeSearch(m[None], p, [torch.Generator().manual_seed(0)], max_candidates=1000)
    state.cols = torch.randperm(m.shape[1], generator=torch.Generator().manual_seed(4)).view(1, 3, p.n)
    state.mark_changed(torch.ones(1, 3, dtype=torch.bool))
    gains = state.swap_gains()[0]
    base = kept_score(m, p, state.perm[0])
    for i, j in combinations(range(m.shape[1]), 2):
        if i // p.n == j // p.n:
            assert gains[i, j] == float("-inf")
            continue
        perm = state.perm[0].clone()
        perm[[i, j]] = perm[[j, i]]
        assert float(gains[i, j]) == pytest.approx(kept_score(m, p, perm) - base, abs=1e-4)


@pytest.mark.parametrize("pattern", ["2:4", "2:8"])
def test_window_scores_match_brute_force(pattern: str) -> None:
    p = Pattern.parse(pattern)
    m = _rand(5, 3 * p.n, seed=5).abs()
    state = StripeSearch(m[None], p, [torch.Generator().manual_seed(0)], max_candidates=1000)
    a, b = torch.tensor([0, 0, 1]), torch.tensor([1, 2, 2])
    gains, choices = state._score_pairs(torch.zeros(3, dtype=torch.long), a, b)
    base = kept_score(m, p)
    for i in range(3):
        cols = torch.cat([state.cols[0, a[i]], state.cols[0, b[i]]])
        best = 0.0
        for cand in state.cand:
            perm = state.perm[0].clone().view(3, p.n)
            moved = cols[cand]
            perm[a[i]], perm[b[i]] = moved[: p.n], moved[p.n :]
            best = max(best, kept_score(m, p, perm.reshape(-1)) - base)
        assert float(gains[i]) == pytest.approx(best, abs=1e-4)
        assert 0 <= int(choices[i]) < state.cand.shape[0]


def _brute_force_best(m: torch.Tensor, p: Pattern) -> float:
    """Best kept score over every partition of the columns into stripes."""
    cols = list(range(m.shape[1]))

    def best(rest: list[int]) -> float:
        if not rest:
            return 0.0
        first, others = rest[0], rest[1:]
        out = 0.0
        for mates in combinations(others, p.n - 1):
            stripe = [first, *mates]
            left = [c for c in others if c not in mates]
            out = max(out, float(topk_sum(m[:, stripe].double(), p.k).sum()) + best(left))
        return out

    return best(cols)


@pytest.mark.parametrize(("seed", "channels"), [(0, 8), (1, 8), (2, 8), (0, 12)])
def test_search_finds_the_optimum_of_small_cases(seed: int, channels: int) -> None:
    w = _rand(6, channels, seed=seed)
    result = search(w, "2:4", seed=seed, max_iters=200)
    assert result.kept == pytest.approx(_brute_force_best(w.abs(), Pattern(2, 4)), rel=1e-6)


@pytest.mark.parametrize("pattern", ["2:4", "6:12", "8:16", "12:16"])
def test_search_returns_a_valid_improving_permutation(pattern: str) -> None:
    p = Pattern.parse(pattern)
    w = _rand(32, 4 * p.n * 2, seed=7)
    result = search(w, pattern, max_iters=100)
    assert sorted(result.perm.tolist()) == list(range(w.shape[1]))
    assert result.kept == pytest.approx(_kept_by_mask(w[:, result.perm], pattern), rel=1e-6)
    assert result.kept_before == pytest.approx(_kept_by_mask(w, pattern), rel=1e-6)
    assert result.kept_before <= result.kept <= result.kept_optimal + 1e-6
    assert 0.0 < result.efficacy <= 1.0


def test_search_is_deterministic_and_seeded() -> None:
    w = _rand(32, 64, seed=2)
    started = time.perf_counter()
    first = search(w, "2:4", seed=3, max_iters=60, walk=20)
    assert 0.0 <= first.seconds <= time.perf_counter() - started  # a duration, not a clock reading
    again = search(w, "2:4", seed=3, max_iters=60, walk=20)
    assert torch.equal(first.perm, again.perm)
    assert first.kept == again.kept


def test_blocks_and_passes_cover_wide_matrices() -> None:
    w = _rand(8, 128, seed=8)
    one = search(w, "2:4", max_iters=0, block_stripes=4, passes=1)
    two = search(w, "2:4", max_iters=0, block_stripes=4, passes=3)
    assert sorted(two.perm.tolist()) == list(range(128))
    assert one.kept_before < one.kept <= two.kept


def test_swap_rounds_only_never_lose_and_windows_add() -> None:
    w = _rand(32, 64, seed=9)
    swaps = search(w, "2:4", max_iters=0, windows=False)
    both = search(w, "2:4", max_iters=0)
    assert sorted(swaps.perm.tolist()) == list(range(64))
    assert swaps.kept_before < swaps.kept <= both.kept


def test_segments_confine_the_permutation() -> None:
    w = _rand(16, 96, seed=14)
    result = search(w, "2:4", max_iters=20, segment=32)
    assert torch.equal(result.perm // 32, torch.arange(96) // 32)
    assert result.kept > result.kept_before
    with pytest.raises(ValueError, match="segment=30"):
        search(w, "2:4", segment=30)


def test_conv_and_shared_weights() -> None:
    conv = _rand(8, 16, 3, 3, seed=9)
    result = search(conv, "2:4", max_iters=50)
    permuted = conv[:, result.perm]
    assert result.kept == pytest.approx(_kept_by_mask(permuted, "2:4"), rel=1e-6)
    lin = _rand(5, 16, seed=10)
    shared = search([conv, lin], "2:4", max_iters=50)
    both = _kept_by_mask(conv[:, shared.perm], "2:4") + _kept_by_mask(lin[:, shared.perm], "2:4")
    assert shared.kept == pytest.approx(both, rel=1e-6)


def test_zero_time_budget_runs_one_deterministic_swap_round() -> None:
    w = _rand(16, 64, seed=11)
    quick, again = (search(w, "2:4", time_budget_s=0.0) for _ in range(2))
    full = search(w, "2:4", max_iters=50)
    assert torch.equal(quick.perm, again.perm)
    assert quick.kept_before < quick.kept <= full.kept


def test_bad_inputs_raise_clear_errors() -> None:
    with pytest.raises(ValueError, match="k:n pattern"):
        search(_rand(4, 8), "unstructured")
    with pytest.raises(ValueError, match=r"\(4, 10\)"):
        search(_rand(4, 10), "2:4", names=["blocks.0.mlp.fc2"])
    with pytest.raises(ValueError, match="different input channels"):
        search([_rand(4, 8), _rand(4, 12)], "2:4")
    with pytest.raises(ValueError, match="conv_order='rsc'"):
        search(_rand(4, 8, 3, 3), "2:4", conv_order="crs")
    with pytest.raises(ValueError, match="max_iters"):
        search(_rand(4, 8), "2:4", max_iters=-1)


@pytest.mark.parametrize("pattern", ["2:4", "2:8"])
def test_greedy_swap_baseline_ends_at_a_swap_optimum(pattern: str) -> None:
    p = Pattern.parse(pattern)
    w = _rand(12, 4 * p.n, seed=12)
    result = greedy_swap_search(w, pattern)
    assert sorted(result.perm.tolist()) == list(range(w.shape[1]))
    assert result.kept == pytest.approx(_kept_by_mask(w[:, result.perm], pattern), rel=1e-6)
    assert result.kept > result.kept_before
    state = StripeSearch(w.abs()[None], p, [torch.Generator().manual_seed(0)], max_candidates=1000)
    state.cols = result.perm.clone().view(1, -1, p.n)
    assert float(state.swap_gains().max()) <= 1e-4


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_search_runs_batched_on_cuda() -> None:
    w = _rand(64, 128, seed=13)
    result = search(w.cuda(), "2:4", max_iters=100)
    assert result.perm.is_cuda
    assert sorted(result.perm.tolist()) == list(range(128))
    assert result.kept == pytest.approx(_kept_by_mask(w[:, result.perm.cpu()], "2:4"), rel=1e-5)
    assert result.kept > result.kept_before


def test_batched_matrices_equal_their_own_searches() -> None:
    """Blocks of several matrices searched as one batch give each matrix the permutation it
    gets alone: every block draws from its own seeded generator."""
    mats = [_rand(24, 64, seed=20).abs(), _rand(24, 64, seed=21).abs(), _rand(40, 96, seed=22).abs()]
    kwargs = {"seed": 5, "max_iters": 40, "walk": 15, "block_stripes": 8, "passes": 2}
    together = search_matrices(mats, Pattern(2, 4), segments=[None, 32, None], **kwargs)
    for m, seg, (perm, steps) in zip(mats, [None, 32, None], together, strict=True):
        [(alone, alone_steps)] = search_matrices([m], Pattern(2, 4), segments=[seg], **kwargs)
        assert torch.equal(perm, alone)
        assert steps == alone_steps
    assert torch.equal(together[1][0] // 32, torch.arange(64) // 32)


def test_iteration_budgets_are_counted_per_block_and_pass() -> None:
    mats = [_rand(16, 64, seed=23).abs(), _rand(16, 64, seed=24).abs()]
    out = search_matrices(mats, Pattern(2, 4), max_iters=[30, 0], block_stripes=8, passes=2, walk=10)
    # 64 channels = 16 stripes = 2 blocks of 8, searched in 2 passes.
    assert [steps for _, steps in out] == [30 * 2 * 2, 0]
    with pytest.raises(ValueError, match="max_iters"):
        search_matrices(mats, Pattern(2, 4), max_iters=[3, -1])


def test_split_budget_by_group_size() -> None:
    ref = 768 * 3072
    iters, rounds = split_budget([ref, ref // 2, ref // 100, ref * 4, ref * 100], 100)
    assert iters == [100, 200, 300, 25, 0]  # 1 step would not be worth a walk
    assert rounds[:3] == [math.inf] * 3
    assert rounds[3:] == [4, 1]


def test_round_cap_limits_swap_rounds() -> None:
    m = _rand(32, 128, seed=25).abs()
    capped = StripeSearch(m[None], Pattern(2, 4), [torch.Generator().manual_seed(0)], max_candidates=1000)
    capped.run(math.inf, 0, 10, 2, max_rounds=2)
    free = StripeSearch(m[None], Pattern(2, 4), [torch.Generator().manual_seed(0)], max_candidates=1000)
    free.run(math.inf, 0, 10, 2)
    assert capped.rounds == 2 < free.rounds
    assert float(capped.totals()) <= float(free.totals())


def test_greedy_groups_scores_a_model_without_changing_it() -> None:
    from knsparse.models import resnet_tiny_digits
    from knsparse.pruning.permutation.apply import find_groups

    torch.manual_seed(0)
    model = resnet_tiny_digits().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    # the groups of the first two stages: the last two take minutes to converge on a CPU
    names = [g.name for g in find_groups(model).groups if not g.name.startswith(("layer3", "layer4"))]
    found = greedy_groups(model, "2:4", names=names, time_budget_s=None)
    assert found and all(g.report.efficacy >= 0 for g in found)
    assert any(g.report.efficacy > 0 and g.swaps > 0 and not g.capped for g in found)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_batched_search_on_cuda_matches_cpu() -> None:
    mats = [_rand(48, 128, seed=26).abs(), _rand(48, 128, seed=27).abs(), _rand(300, 64, seed=28).abs()]
    kwargs = {"seed": 1, "max_iters": 50, "walk": 20, "block_stripes": 16}
    cpu = search_matrices(mats, Pattern(2, 4), **kwargs)
    gpu = search_matrices([m.cuda() for m in mats], Pattern(2, 4), **kwargs)
    for m, (a, _), (b, _) in zip(mats, cpu, gpu, strict=True):
        assert b.is_cuda and sorted(b.tolist()) == list(range(m.shape[1]))
        # Float rounding may break a tie differently; the kept scores agree closely.
        assert kept_score(m, Pattern(2, 4), b.cpu()) == pytest.approx(
            kept_score(m, Pattern(2, 4), a), rel=2e-3
        )


def _reference_tabu_walk(state: StripeSearch, steps: int, tenure: tuple[int, int]) -> torch.Tensor:
    """The tabu walk written plainly: every step recomputes the whole swap-gain table from
    ``delta`` (:meth:`StripeSearch._gains`) and masks tabu columns with ``masked_fill``."""
    blocks, channels = state.perm.shape
    rows = torch.arange(blocks)
    tabu_until = torch.zeros(blocks, channels, dtype=torch.long)
    state._refresh_delta()
    current = state.stripe_kept.sum(1)
    best, best_cols = current.clone(), state.cols.clone()
    tol = state.tol.double()
    holds = torch.stack(
        [torch.randint(tenure[0], tenure[1] + 1, (steps, 2), generator=g) for g in state.gens], 1
    )
    active = torch.ones(blocks, dtype=torch.bool)
    for step in range(steps):
        gain = state._gains()
        value, flat = gain.view(blocks, -1).max(dim=1)
        perm = state.perm
        tabu = tabu_until.gather(1, perm) > step
        hits = tabu.gather(1, torch.stack([flat // channels, flat % channels], 1)).any(1)
        free = gain.masked_fill(tabu[:, :, None] | tabu[:, None, :], -math.inf)
        free_value, free_flat = free.view(blocks, -1).max(dim=1)
        fall_back = hits & ~(value.double() > best - current + tol)
        value, flat = torch.where(fall_back, free_value, value), torch.where(fall_back, free_flat, flat)
        active &= value > -math.inf
        p0, p1 = torch.where(active, flat // channels, 0), torch.where(active, flat % channels, 0)
        moved0, moved1 = perm[rows, p0], perm[rows, p1]
        perm[rows, p0], perm[rows, p1] = moved1, moved0
        state._refresh(None, torch.stack([p0, p1], 1) // state.n)
        hold = step + 1 + holds[step]
        tabu_until[rows, moved0] = torch.where(active, hold[:, 0], tabu_until[rows, moved0])
        tabu_until[rows, moved1] = torch.where(active, hold[:, 1], tabu_until[rows, moved1])
        current = state.stripe_kept.sum(1)
        better = current > best + tol
        best = torch.where(better, current, best)
        best_cols = torch.where(better[:, None, None], state.cols, best_cols)
    state.restore(best_cols)
    return best


@pytest.mark.parametrize("pattern", ["2:4", "2:8"])
def test_tabu_walk_equals_its_plain_reference(pattern: str) -> None:
    """The walk's incrementally kept gain tables pick the same swaps as recomputing them."""
    p = Pattern.parse(pattern)
    m = torch.stack([_rand(24, 8 * p.n, seed=40 + i).abs() for i in range(3)])
    states = [
        StripeSearch(m, p, [torch.Generator().manual_seed(i) for i in range(3)], 1000) for _ in range(2)
    ]
    for state in states:
        state.swap_round()
    fast = states[0].tabu_walk(40, math.inf, (3, 6))
    slow = _reference_tabu_walk(states[1], 40, (3, 6))
    assert torch.equal(states[0].cols, states[1].cols)
    assert torch.equal(fast, slow)
    assert torch.allclose(fast, states[0].totals(), rtol=1e-6)
