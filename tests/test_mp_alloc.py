import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from knsparse.budget.mp_alloc import mp_layer_sparsities, mp_randomness
from knsparse.spectral import MPFit


def fit(bulk_energy, fit_error):
    return MPFit(64, 128, 0.5, 1.0, 0.09, 2.9, 19.0, 3.0, 0, 1.0, bulk_energy, fit_error)


layer_st = st.tuples(st.floats(0.0, 1.0), st.floats(0.0, 0.5), st.integers(1, 5_000_000))


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(layer_st, min_size=1, max_size=30),
    target=st.floats(0.0, 0.95),
    strength=st.floats(0.0, 8.0),
)
def test_weighted_mean_meets_target_within_a_tenth_of_a_point(layers, target, strength):
    fits = {f"l{i}": fit(b, e) for i, (b, e, _) in enumerate(layers)}
    numels = {f"l{i}": n for i, (_, _, n) in enumerate(layers)}
    got = mp_layer_sparsities(fits, numels, target, strength=strength)
    mean = sum(got[k] * numels[k] for k in got) / sum(numels.values())
    assert abs(mean - target) < 1e-3  # 0.1 percentage point
    assert all(0.0 <= s <= 0.95 for s in got.values())


def test_random_like_layers_get_larger_budgets():
    fits = {"mp_like": fit(0.98, 0.01), "spiky": fit(0.3, 0.2), "heavy_tail": fit(0.9, 0.4)}
    got = mp_layer_sparsities(fits, dict.fromkeys(fits, 1000), 0.6)
    assert got["mp_like"] > got["heavy_tail"] > got["spiky"]
    assert mp_randomness(fits["mp_like"]) == pytest.approx(0.98 * 0.99)


def test_zero_strength_is_uniform():
    fits = {"a": fit(0.9, 0.0), "b": fit(0.1, 0.3)}
    got = mp_layer_sparsities(fits, {"a": 10, "b": 1000}, 0.7, strength=0.0)
    assert got == pytest.approx({"a": 0.7, "b": 0.7})


def test_infeasible_or_mismatched_requests_raise():
    fits = {"a": fit(0.9, 0.0)}
    with pytest.raises(ValueError, match="outside"):
        mp_layer_sparsities(fits, {"a": 10}, 0.99)
    with pytest.raises(ValueError, match="different layers"):
        mp_layer_sparsities(fits, {"b": 10}, 0.5)
