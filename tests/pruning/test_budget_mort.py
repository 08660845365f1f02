"""MORT: exact budgets by bisection, guarantees, fallback warnings, nested masks."""

import warnings

import pytest
import torch

from knsparse.pruning.budget import mort
from knsparse.pruning.budget.mort import _standardise

SWEEP = [0.0, 0.3, 0.5, 0.5004, 0.7, 0.9, 0.95, 0.98, 0.99]


def scores(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {
        "a": torch.randn(64, 96, generator=g).abs(),
        "conv": torch.rand(32, 16, 3, 3, generator=g) * 7 + 1,
        "b": torch.randn(40, 50, generator=g).exp(),
    }


def realised(masks: dict[str, torch.Tensor]) -> float:
    total = sum(m.numel() for m in masks.values())
    return 1 - sum(int(m.sum()) for m in masks.values()) / total


@pytest.mark.parametrize("robust", ["mad", "std"])
@pytest.mark.parametrize("target", [0.5, 0.9, 0.98])
def test_global_hits_target_within_tolerance_without_warning(robust, target):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = mort(scores(), target, mode="global", robust=robust)
    assert abs(realised(masks) - target) <= 1e-3
    assert all(masks[k].shape == v.shape and masks[k].dtype == torch.bool for k, v in scores().items())


@pytest.mark.parametrize("target", [0.5, 0.9, 0.98])
def test_layerwise_hits_target_in_every_layer(target):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        masks = mort(scores(), target, mode="layerwise")
    for m in masks.values():
        assert abs(realised({"m": m}) - target) <= 1e-3


def test_masks_are_thresholds_of_the_robust_z_score():
    """Outside the guaranteed keeps, kept and pruned weights are split by one α on z."""
    s = scores()
    masks = mort(s, 0.8, mode="global", min_keep_row=0)
    kept_min = min(float(_standardise(s[k], "mad")[masks[k].flatten()].min()) for k in s)
    pruned_max = max(float(_standardise(s[k], "mad")[~masks[k].flatten()].max()) for k in s)
    assert pruned_max < kept_min


@pytest.mark.parametrize("mode", ["global", "layerwise"])
@pytest.mark.parametrize("robust", ["mad", "std"])
def test_masks_are_nested_across_budgets(mode, robust):
    s = scores(1)
    s["ties"] = torch.randint(0, 4, (30, 40)).float()  # ties force the percentile fallback
    prev = None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for target in SWEEP:
            masks = mort(s, target, mode=mode, robust=robust, min_keep_col=1)
            if prev is not None:
                assert all(not (masks[k] & ~prev[k]).any() for k in s), target
            prev = masks


def test_min_keep_row_and_col_are_guaranteed_and_named_when_infeasible():
    s = scores()
    with pytest.warns(UserWarning, match=r"infeasible.*min_keep_row keeps 136.*min_keep_col keeps"):
        masks = mort(s, 0.995, min_keep_row=1, min_keep_col=1)
    for k, m in masks.items():
        rows = m.reshape(m.shape[0], -1)
        assert (rows.sum(1) >= 1).all() and (rows.sum(0) >= 1).all(), k


def test_ties_fall_back_to_exact_percentile_with_a_warning():
    s = {"t": torch.tensor([[1.0] * 50 + [2.0] * 50] * 10)}
    with pytest.warns(UserWarning, match="tied scores"):
        masks = mort(s, 0.3, mode="layerwise", min_keep_row=0)
    assert int((~masks["t"]).sum()) == 300


def test_small_layer_granularity_is_named():
    s = {"tiny": torch.arange(30.0).reshape(3, 10)}
    with pytest.warns(UserWarning, match="only 30 weights"):
        masks = mort(s, 0.51, mode="layerwise", min_keep_row=0)
    assert int((~masks["tiny"]).sum()) == 15


def test_zero_sparsity_keeps_everything():
    masks = mort(scores(), 0.0)
    assert all(m.all() for m in masks.values())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": 0.5, "mode": "row"}, "mode"),
        ({"sparsity": 0.5, "robust": "iqr"}, "robust"),
        ({"sparsity": 0.5, "tol": 0}, "tol"),
        ({"sparsity": 0.5, "min_keep_row": -1}, "min_keep"),
    ],
)
def test_bad_arguments_raise(kwargs, match):
    with pytest.raises(ValueError, match=match):
        mort(scores(), **kwargs)


def test_nan_scores_raise_naming_the_layer():
    s = scores()
    s["b"][0, 0] = float("nan")
    with pytest.raises(ValueError, match="layer 'b'"):
        mort(s, 0.5)
