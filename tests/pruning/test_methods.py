import itertools
from dataclasses import replace

import pytest
import torch

from knsparse.core.masks import global_unstructured_masks, group_nonzeros, nm_mask, unstructured_mask
from knsparse.core.pattern import Pattern
from knsparse.pruning.calibration import InputStats
from knsparse.pruning.methods import Layer, cast, greedy_group_select, hybrid, magnitude, rmt, ser
from knsparse.pruning.methods.base import data_path_scores
from knsparse.pruning.methods.cast import robust_gram
from knsparse.pruning.spectral import mp_fit

P24 = Pattern.parse("2:4")


def inputs(samples, k, seed=0):
    """Correlated inputs with very different column scales, like post-LayerNorm activations."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(samples, k, generator=g)
    mix = torch.eye(k) + 0.6 * torch.randn(k, k, generator=g) / k**0.5
    return (base @ mix) * torch.exp(torch.randn(k, generator=g))


def stats_of(x, n):
    blocks = x.reshape(x.shape[0], -1, n)
    xd = x.double()
    return InputStats(
        x.shape[0],
        xd.square().sum(0),
        torch.einsum("tgi,tgj->gij", blocks, blocks).double(),
        xd.T @ xd,
        x.shape[0],
    )


def layer(name, out, k, seed=0, x=None, n=4, is_conv=False):
    g = torch.Generator().manual_seed(seed + 100)
    w = torch.randn(out, k, generator=g) * 0.05
    w += torch.randn(out, 3, generator=g) @ torch.randn(3, k, generator=g) * 0.05  # a few spikes
    return Layer(name, w, is_conv, mp_fit(w), None if x is None else stats_of(x, n))


def exactly_k_per_group(mask, pattern):
    return bool((group_nonzeros(mask, pattern) == pattern.k).all())


def test_magnitude_matches_the_mask_primitives():
    layers = {"a": layer("a", 16, 32), "b": layer("b", 8, 64, seed=1)}
    kn = magnitude(layers, P24, None)
    assert torch.equal(kn["a"].mask, nm_mask(layers["a"].weight.abs(), P24))
    per_layer = magnitude(layers, None, 0.6)
    assert torch.equal(per_layer["b"].mask, unstructured_mask(layers["b"].weight.abs(), 0.6))
    glob = magnitude(layers, None, 0.6, mode="global")
    expect = global_unstructured_masks({n: lay.weight.abs() for n, lay in layers.items()}, 0.6)
    assert all(torch.equal(glob[n].mask, expect[n]) for n in layers)
    with pytest.raises(ValueError, match="mode"):
        magnitude(layers, None, 0.6, mode="rows")


@pytest.mark.parametrize("spec", ["2:4", "6:12", "8:16"])
def test_greedy_selection_with_identity_or_diagonal_gram_is_magnitude_or_wanda(spec):
    pattern = Pattern.parse(spec)
    w = torch.randn(12, 48)
    eye = torch.eye(pattern.n).expand(48 // pattern.n, pattern.n, pattern.n)
    assert torch.equal(greedy_group_select(w, eye, pattern), nm_mask(w.abs(), pattern))
    scale = torch.rand(48) + 0.1
    diag = torch.diag_embed(scale.square().reshape(-1, pattern.n))
    assert torch.equal(greedy_group_select(w, diag, pattern), nm_mask(w.abs() * scale, pattern))


def output_error(w, mask, x):
    return float(((w * ~mask) @ x.T).square().sum())


def test_cast_preserves_the_data_path_better_than_magnitude():
    x = inputs(512, 64)
    for spec in ["2:4", "8:16"]:
        pattern = Pattern.parse(spec)
        lay = layer("fc", 32, 64, x=x, n=pattern.n)
        chosen = cast({"fc": lay}, pattern)["fc"]
        assert exactly_k_per_group(chosen.mask, pattern)
        mag = nm_mask(lay.weight.abs(), pattern)
        assert output_error(lay.weight, chosen.mask, x) < 0.8 * output_error(lay.weight, mag, x)


def test_greedy_is_close_to_the_exhaustive_optimum_on_2_4():
    x = inputs(256, 16, seed=3)
    lay = layer("fc", 64, 16, x=x)
    gram = lay.stats.group_gram()
    mask = greedy_group_select(lay.weight, gram, P24)
    w = lay.weight.reshape(64, 4, 4)
    best = torch.full((64, 4), float("inf"))
    for keep in itertools.combinations(range(4), 2):
        r = w.clone()
        r[..., list(keep)] = 0
        best = torch.minimum(best, torch.einsum("ogi,gij,ogj->og", r, gram, r))
    r = (lay.weight * ~mask).reshape(64, 4, 4)
    greedy = torch.einsum("ogi,gij,ogj->og", r, gram, r)
    assert float(greedy.sum()) <= 1.02 * float(best.sum())


def test_free_restoration_refills_groups_up_to_k_with_their_best_pruned_entries():
    w = torch.tensor([[4.0, 3.0, 2.0, 1.0, 8.0, 7.0, 6.0, 5.0]])
    premask = torch.tensor([[False, False, False, True, True, True, True, False]])
    eye = torch.eye(4).expand(2, 4, 4)
    mask = greedy_group_select(w, eye, P24, premask)
    # group 1 had 1 survivor (w=1): the best pruned entry (w=4) comes back; group 2 had 3
    # survivors (8, 7, 6): the smallest survivor goes, the pruned 5 stays pruned.
    assert mask.tolist() == [[True, False, False, True, True, True, False, False]]


def test_cast_with_premask_counts_freely_restored_entries():
    x = inputs(256, 64, seed=5)
    layers = {"fc": layer("fc", 32, 64, x=x), "conv": layer("conv", 16, 64, seed=2, x=x, is_conv=True)}
    result = cast(layers, P24, sparsity=0.8)
    for name, d in result.items():
        assert exactly_k_per_group(d.mask, P24)
        pre = hybrid(layers, None, 0.8)[name].mask
        assert d.freely_restored == int((d.mask & ~pre).sum()) > 0
        short = (group_nonzeros(pre, P24) < 2).sum()
        assert d.freely_restored >= int(short)
    # The kept weights are re-fitted by default (CAST_RECONSTRUCT), convolutions too.
    assert result["conv"].rule == "magnitude 2:4 + refit"
    assert cast(layers, P24, convs=True)["conv"].rule == "cast-conv 2:4 + refit"
    assert cast(layers, P24, reconstruct=False)["conv"].rule == "magnitude 2:4"


def test_cast_needs_kn_and_statistics():
    with pytest.raises(ValueError, match="k:n"):
        cast({"fc": layer("fc", 8, 16, x=inputs(32, 16))}, None, 0.5)
    with pytest.raises(ValueError, match="calibration"):
        cast({"fc": layer("fc", 8, 16)}, P24)


def test_ser_meets_each_mp_budget_and_reduces_to_magnitude_without_data():
    layers = {"a": layer("a", 32, 64), "b": layer("b", 64, 64, seed=1)}
    no_data = ser(layers, None, 0.7)
    numel = {n: lay.weight.numel() for n, lay in layers.items()}
    mean = sum((1 - no_data[n].mask.float().mean().item()) * numel[n] for n in layers) / sum(numel.values())
    assert mean == pytest.approx(0.7, abs=1e-3)
    for n, d in no_data.items():
        assert torch.equal(d.mask, unstructured_mask(layers[n].weight.abs(), d.target_sparsity))
        assert d.extra["restored"] == 0


def test_ser_with_data_restores_entries_useful_on_the_data_path():
    x = inputs(256, 64, seed=7)
    lay = layer("fc", 32, 64, x=x)
    d = ser({"fc": lay}, None, 0.6, reservoir=0.2)["fc"]
    mag = unstructured_mask(lay.weight.abs(), 0.6)
    assert d.mask.sum() == mag.sum()
    assert d.extra["restored"] > 0
    assert output_error(lay.weight, d.mask, x) < output_error(lay.weight, mag, x)


def test_ser_restore_score_is_the_diagonal_of_the_robust_gram():
    x = inputs(128, 16, seed=3)
    lay = layer("fc", 8, 16, x=x)
    for alpha in (0.0, 0.3, 1.0):
        diag = robust_gram(lay.stats.group_gram(), alpha).diagonal(dim1=-2, dim2=-1).reshape(-1)
        expected = lay.weight.abs() * diag.sqrt()
        assert torch.allclose(data_path_scores(lay, alpha), expected, rtol=1e-5)
    column_norms = x.square().mean(0).sqrt()
    assert torch.allclose(data_path_scores(lay, 0.0), lay.weight.abs() * column_norms, rtol=1e-5)


def test_ser_shrinkage_moves_the_restore_from_the_data_path_to_magnitude():
    x = inputs(256, 64, seed=7)
    layers = {"a": layer("a", 32, 64, x=x), "b": layer("b", 64, 64, seed=1, x=x)}
    no_data = ser({n: replace(lay, stats=None) for n, lay in layers.items()}, None, 0.7)
    magnitude_like = ser(layers, None, 0.7, shrinkage=1.0)
    wanda_like = ser(layers, None, 0.7, shrinkage=0.0, reservoir=0.2)
    for n in layers:
        assert torch.equal(magnitude_like[n].mask, no_data[n].mask)
        assert magnitude_like[n].extra["restored"] == 0
        assert wanda_like[n].mask.sum() == no_data[n].mask.sum()
        assert output_error(layers[n].weight, wanda_like[n].mask, x) < output_error(
            layers[n].weight, no_data[n].mask, x
        )
    with pytest.raises(ValueError, match="shrinkage"):
        ser(layers, None, 0.7, shrinkage=-0.1)


def test_hybrid_switches_from_magnitude_to_ser():
    layers = {"a": layer("a", 32, 64, x=inputs(64, 64))}
    low = hybrid(layers, None, 0.4)["a"]
    assert low.rule == "hybrid/magnitude"
    assert torch.equal(low.mask, unstructured_mask(layers["a"].weight.abs(), 0.4))
    high = hybrid(layers, None, 0.7, switch=0.6)["a"]
    assert high.rule == "hybrid/ser"
    assert torch.equal(high.mask, ser(layers, None, 0.7)["a"].mask)
    with pytest.raises(ValueError, match="cast"):
        hybrid(layers, P24, None)


def test_rmt_keeps_the_spikes_and_drops_the_bulk():
    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(48, 3, generator=g), torch.randn(3, 96, generator=g)
    w = u @ v + 0.05 * torch.randn(48, 96, generator=g)
    d = rmt({"a": Layer("a", w, False, mp_fit(w))}, P24, None)["a"]
    assert d.extra["rank"] == 3
    assert torch.linalg.matrix_rank(d.weight) == 3
    assert float((d.weight - u @ v).norm()) < float((w - u @ v).norm())
    assert exactly_k_per_group(d.mask, P24)


def test_shrinkage_moves_cast_from_the_data_path_to_magnitude():
    x = inputs(256, 64, seed=9)
    lay = layer("fc", 32, 64, x=x)
    pure = cast({"fc": lay}, P24, shrinkage=0.0)["fc"].mask
    assert torch.equal(pure, greedy_group_select(lay.weight, lay.stats.group_gram(), P24))
    assert torch.equal(cast({"fc": lay}, P24, shrinkage=1.0)["fc"].mask, nm_mask(lay.weight.abs(), P24))
    with pytest.raises(ValueError, match="shrinkage"):
        cast({"fc": lay}, P24, shrinkage=1.5)
