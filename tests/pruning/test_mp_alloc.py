import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from knsparse.pruning.budget.mp_alloc import mp_layer_sparsities
from knsparse.pruning.spectral import MPFit, mp_fit


def fit_with(sigma2, m=64):
    return MPFit(m, 2 * m, 0.5, sigma2, 0.09, 2.9, 19.0, 3.0, 0, 1.0, 1.0, 0.0)


layer_st = st.tuples(
    st.integers(1, 3000),  # weights
    st.floats(1e-4, 10.0),  # sigma² of the fit
    st.integers(1, 64),  # eigenvalues of the fit
    st.sampled_from(["gauss", "heavy", "ties"]),
)


@settings(max_examples=60, deadline=None)
@given(
    layers=st.lists(layer_st, min_size=1, max_size=12), target=st.floats(0.0, 0.9), seed=st.integers(0, 99)
)
def test_weighted_mean_meets_target_within_a_tenth_of_a_point(layers, target, seed):
    g = torch.Generator().manual_seed(seed)
    weights, fits = {}, {}
    for i, (numel, s2, m, kind) in enumerate(layers):
        w = torch.randn(numel, generator=g)
        if kind == "heavy":
            w = w**3
        elif kind == "ties":
            w = w.round()
        weights[f"l{i}"], fits[f"l{i}"] = w, fit_with(s2, m)
    total = sum(w.numel() for w in weights.values())
    if round(target * total) > sum(
        math.floor(0.95 * w.numel()) for n, w in weights.items() if fits[n].m >= 16
    ):
        with pytest.raises(ValueError, match="at most"):
            mp_layer_sparsities(fits, weights, target)
        return
    got = mp_layer_sparsities(fits, weights, target)
    mean = sum(got[n] * w.numel() for n, w in weights.items()) / total
    # exact up to one weight: within 0.1 percentage point as soon as there are >= 500 weights
    assert abs(mean - target) <= 0.5 / total + 1e-12
    assert all(0.0 <= s <= 0.95 + 1e-12 for s in got.values())
    assert all(got[n] == 0.0 for n in fits if fits[n].m < 16)


def test_layers_are_pruned_below_one_threshold_in_units_of_their_noise_level():
    g = torch.Generator().manual_seed(0)
    mp_like = torch.randn(128, 256, generator=g) * 0.02
    spiky = (
        torch.randn(128, 256, generator=g) * 0.02
        + 0.2 * torch.randn(128, 4, generator=g) @ torch.randn(4, 256, generator=g) / 16
    )
    weights = {"mp_like": mp_like, "spiky": spiky}
    fits = {n: mp_fit(w) for n, w in weights.items()}
    got = mp_layer_sparsities(fits, weights, 0.5)
    assert got["mp_like"] > 0.5 > got["spiky"]  # the layer with learned structure is protected
    tau = [
        torch.quantile(w.abs().reshape(-1) / math.sqrt(fits[n].sigma2), got[n]).item()
        for n, w in weights.items()
    ]
    assert tau[0] == pytest.approx(tau[1], rel=0.02)


def test_too_small_spectra_stay_dense_and_caps_bind():
    weights = {"head": torch.randn(10, 64), "body": torch.randn(256, 256), "tiny": torch.randn(64, 4)}
    fits = {n: mp_fit(w) for n, w in weights.items()}
    got = mp_layer_sparsities(fits, weights, 0.5, max_sparsity=0.9)
    assert got["head"] == 0.0 and got["tiny"] == 0.0
    total = sum(w.numel() for w in weights.values())
    assert got["body"] == pytest.approx(round(0.5 * total) / weights["body"].numel())
    with pytest.raises(ValueError, match="at most"):
        mp_layer_sparsities(fits, weights, 0.89, max_sparsity=0.9)
    with pytest.raises(ValueError, match="different layers"):
        mp_layer_sparsities(fits, {"body": weights["body"]}, 0.5)
