"""EMP: effective number, mask helpers, and the kept-mass lower bound (property test)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knsparse.pruning.budget import emp_global_masks, emp_keep, emp_mask, emp_mass_bound, emp_row_masks


def kept_mass(s: torch.Tensor, k: int) -> float:
    a = s.abs().double().flatten()
    total = float(a.sum())
    return 1.0 if total == 0 else float(a.sort(descending=True).values[:k].sum()) / total


def test_effective_number_of_simple_distributions():
    assert emp_keep(torch.ones(50)) == 50
    assert emp_keep(torch.tensor([0.0, 3.0, 0.0])) == 1
    assert emp_keep(torch.tensor([1.0, -1.0, 0.0, 0.0])) == 2  # ω = |s| / Σ|s|
    assert emp_keep(torch.tensor([2.0, 1.0, 1.0])) == 2  # Σω² = 3/8 -> floor(8/3)
    assert emp_keep(torch.tensor([2.0, 1.0, 1.0]), beta=2.0) == 3  # floor(16/3) clipped to N
    assert emp_keep(torch.tensor([2.0, 1.0, 1.0]), beta=0.1) == 1  # clipped up to 1
    assert emp_keep(torch.zeros(10)) == 10  # all-zero: the equal-scores limit


def test_masks_keep_the_effective_number_of_largest_magnitudes():
    g = torch.Generator().manual_seed(0)
    s = torch.randn(16, 8, 3, 3, generator=g)
    m = emp_mask(s)
    k = emp_keep(s)
    assert int(m.sum()) == k and s.abs()[m].min() >= s.abs()[~m].max()
    rows = emp_row_masks(s)
    for r in range(16):
        assert int(rows[r].sum()) == emp_keep(s[r])
        assert s[r].abs()[rows[r]].min() >= s[r].abs()[~rows[r]].max()
    pooled = {"a": s, "b": torch.randn(5, 7, generator=g) * 3}
    masks = emp_global_masks(pooled)
    flat = torch.cat([v.flatten() for v in pooled.values()])
    assert sum(int(v.sum()) for v in masks.values()) == emp_keep(flat)


def test_zero_rows_are_finite_and_nan_raises():
    s = torch.randn(4, 6)
    s[1] = 0
    assert int(emp_row_masks(s)[1].sum()) == 6
    s[2, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        emp_keep(s)
    with pytest.raises(ValueError, match="layer 'x'"):
        emp_global_masks({"x": s})


score_vectors = st.one_of(
    st.lists(st.floats(-1e3, 1e3, allow_nan=False, width=32), min_size=1, max_size=300),
    # heavy tails: one or a few dominant entries over a flat floor
    st.builds(
        lambda n, big, floor: [big] * 3 + [floor] * n,
        st.integers(1, 400),
        st.floats(1e-3, 1e4),
        st.floats(0, 1),
    ),
    # sparse vectors with ties
    st.lists(st.sampled_from([0.0, 0.0, 0.0, 1.0, 2.0, -5.0]), min_size=1, max_size=200),
)


@settings(max_examples=300, deadline=None)
@given(values=score_vectors, beta=st.floats(0.05, 8.0))
def test_kept_mass_is_at_least_the_bound(values, beta):
    s = torch.tensor(values, dtype=torch.float64)
    k = emp_keep(s, beta)
    assert 1 <= k <= len(values)
    assert kept_mass(s, k) >= emp_mass_bound(len(values), k, beta) - 1e-9


def test_bound_is_nearly_attained_by_one_dominant_share():
    """ω = (a, rest equal): the bound is within a few percent of the kept mass."""
    n = 100_000
    s = torch.full((n,), 1.0, dtype=torch.float64)
    s[0] = 0.1 * n / 0.9  # a = 0.1 of the total mass
    k = emp_keep(s)
    bound = emp_mass_bound(n, k)
    assert k == 99 and bound <= kept_mass(s, k) < 1.06 * bound


def test_bound_closed_form_and_argument_checks():
    assert emp_mass_bound(10, 10) == 1.0
    assert emp_mass_bound(10, 1) == pytest.approx(0.5)
    k = 100
    root = (math.sqrt(1 + 4 * 99 * 100 / 101) - 1) / 198
    assert emp_mass_bound(10**6, k) == pytest.approx(root)
    assert emp_mass_bound(200, k) == pytest.approx(0.5)  # k / N dominates
    for bad in ((0, 1), (10, 0), (10, 11)):
        with pytest.raises(ValueError):
            emp_mass_bound(*bad)
