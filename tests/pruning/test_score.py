"""knsparse.score: magnitude, YOPO scores and YOPO k:n masks."""

import pytest
import torch
from torch import nn

from knsparse.core.masks import from_reduction_view, nm_mask, to_reduction_view
from knsparse.kernels.nmf import nmf_init, nmf_ref
from knsparse.pruning.score import magnitude, prunable_weights, yopo, yopo_nm_masks
from knsparse.pruning.score.buckets import WORKING_COPIES, Problem, plan_chunks
from knsparse.pruning.score.yopo import _layer_seed, _median_scale

ITERS = 30


def small_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(8, 16, 3),
        nn.ReLU(),
        nn.Conv2d(16, 16, 1),
        nn.Flatten(),
        nn.Linear(64, 24),
        nn.Linear(24, 8),
        nn.Linear(8, 32),  # tall: fitted as its transpose
    )


def test_scores_have_weight_shapes_and_are_finite():
    model = small_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    scores = yopo(model, iters=ITERS)
    assert list(scores) == ["0", "2", "4", "5", "6"]
    for name, m in model.named_modules():
        if name in scores:
            assert scores[name].shape == m.weight.shape and scores[name].dtype == torch.float32
            assert torch.isfinite(scores[name]).all() and (scores[name] >= 0).all()
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


@pytest.mark.parametrize("shape", [(12, 6, 3, 3), (40, 12)])
def test_scores_equal_residual_of_reference_fit(shape):
    """End to end against the kernels' reference: |X/median - V H| of a reference fit, in weight
    shape; a tall matrix (40 x 12) is fitted as its transpose."""
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(1))
    scores = yopo({"w": w}, rank=4, iters=ITERS, seed=5)["w"]
    x = to_reduction_view(w).abs() / w.abs().median()
    tall = x.shape[0] > x.shape[1]
    xo = (x.T if tall else x)[None].contiguous()
    v0, h0 = nmf_init(xo, 4, torch.Generator().manual_seed(_layer_seed(5, "w")))
    v, h = nmf_ref(xo, v0, h0, torch.tensor([xo.shape[1:]], dtype=torch.int32), ITERS)
    residual = (xo[0] - v[0] @ h[0]).abs()
    expected = from_reduction_view(residual.T if tall else residual, w.shape)
    torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_seeded_deterministic_and_independent_of_layer_selection_and_chunking():
    model = small_model()
    a = yopo(model, iters=ITERS, seed=3)
    b = yopo(model, iters=ITERS, seed=3, layers=["4"])
    c = yopo(model, iters=ITERS, seed=3, max_chunk_bytes=1)  # one matrix per kernel call
    assert torch.equal(a["4"], b["4"])
    assert all(torch.equal(a[k], c[k]) for k in a)
    assert not torch.equal(a["4"], yopo(model, iters=ITERS, seed=4)["4"])


def test_normalize_only_rescales_by_the_median():
    model = small_model()
    raw = yopo(model, iters=ITERS, normalize=False)
    norm = yopo(model, iters=ITERS, normalize=True)
    for name, w in prunable_weights(model).items():
        torch.testing.assert_close(norm[name] * _median_scale(w), raw[name], rtol=1e-3, atol=1e-6)


def test_per_channel_fits_each_kxk_kernel_rank_one():
    w = torch.randn(5, 4, 3, 3, generator=torch.Generator().manual_seed(2)).abs()
    w[2] = torch.outer(torch.rand(4) + 0.1, torch.rand(9) + 0.1).reshape(4, 3, 3)  # exactly rank 1
    scores = yopo({"k": w, "fc": torch.randn(6, 8)}, per_channel=True, normalize=False, iters=400)
    assert scores["k"].shape == w.shape
    assert scores["k"][2].max() < 1e-3 * w[2].max()  # a rank-1 channel is explained exactly
    assert scores["k"][[0, 1, 3, 4]].mean() > 100 * scores["k"][2].mean()
    assert scores["fc"].shape == (6, 8)  # Linear keeps the whole-layer fit


def test_zero_rows_columns_and_zero_layers_give_finite_scores():
    w = torch.randn(16, 32)
    w[3] = 0
    w[:, 7] = 0
    scores = yopo({"w": w, "zero": torch.zeros(8, 8), "conv": torch.zeros(4, 2, 3, 3)}, iters=ITERS)
    assert all(torch.isfinite(s).all() for s in scores.values())
    assert scores["zero"].abs().max() == 0


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_nan_or_inf_weight_raises_naming_the_layer(bad):
    model = small_model()
    with torch.no_grad():
        model[4].weight[0, 0] = bad
    with pytest.raises(ValueError, match=r"layer '4'.*(NaN|Inf)"):
        yopo(model, iters=1)


def test_unknown_layer_and_bad_weight_shape_raise():
    with pytest.raises(ValueError, match="unknown layers"):
        yopo(small_model(), layers=["nope"])
    with pytest.raises(ValueError, match="layer 'v'"):
        yopo({"v": torch.ones(3)})


def test_yopo_nm_masks_equal_nm_mask_of_yopo_scores():
    model = small_model()
    layers = ["0", "2", "4", "5", "6"]  # reduction sizes 72 (RSC: Cin=8), 16, 64, 24, 8
    scores = yopo(model, iters=ITERS)
    for pattern in ("2:4", "4:8"):
        masks = yopo_nm_masks(model, pattern, iters=ITERS, layers=layers)
        for name in layers:
            assert torch.equal(masks[name], nm_mask(scores[name], pattern)), (pattern, name)


def test_yopo_nm_masks_reject_ungroupable_layer_by_name():
    model = nn.Sequential(nn.Conv2d(3, 8, 3))
    with pytest.raises(ValueError, match=r"layer '0'.*3 input channels"):
        yopo_nm_masks(model, "2:4")


def test_magnitude_is_abs_weight():
    model = small_model()
    mags = magnitude(model)
    assert torch.equal(mags["4"], model[4].weight.detach().abs())


def vit_large_problems() -> list[Problem]:
    """Whole-layer problems of a ViT-L/16 (24 blocks, width 1024, MLP 4096)."""
    cpu = torch.device("cpu")
    problems = [Problem("patch_embed.proj", 1, 1024, 768, 7, cpu), Problem("head", 1, 1000, 1024, 7, cpu)]
    for i in range(24):
        for name, (m, n) in {
            "attn.qkv": (3072, 1024),
            "attn.proj": (1024, 1024),
            "mlp.fc1": (4096, 1024),
            "mlp.fc2": (1024, 4096),
        }.items():
            problems.append(Problem(f"blocks.{i}.{name}", 1, m, n, 7, cpu))
    return problems


def test_vit_large_scoring_is_chunked_within_the_memory_budget():
    problems = vit_large_problems()
    budget = 256 * 2**20
    chunks = plan_chunks(problems, budget)
    assert max(c.nbytes for c in chunks) <= budget
    whole = WORKING_COPIES * 4 * sum(p.m * p.n for p in problems)
    assert whole > 10 * budget  # the unchunked working set (~3.6 GiB) would not fit
    covered = sorted((p.problem, p.start, p.stop) for c in chunks for p in c.pieces)
    assert covered == [(i, 0, 1) for i in range(len(problems))]
    assert len(chunks) < len(problems) / 2  # same-shape layers still share kernel calls


def test_unpadded_buckets_hold_equal_shapes_only():
    problems = [*vit_large_problems()[:4], Problem("odd", 1, 1000, 1024, 7, torch.device("cpu"))]
    chunks = plan_chunks(problems, 2**40, pad=False)
    for c in chunks:
        assert all((problems[p.problem].m, problems[p.problem].n) == (c.mp, c.np) for p in c.pieces)
    assert {(c.mp, c.np) for c in chunks} == {(p.m, p.n) for p in problems}
    padded = plan_chunks(problems, 2**40)
    assert any(c.mp != problems[p.problem].m for c in padded for p in c.pieces)  # 1000 rows pad to 1024


@pytest.mark.parametrize("conv_order", ["rsc", "crs"])
def test_conv_scores_follow_conv_order_fit_whatever_the_layout(conv_order):
    """yopo fits convs as reshaped weights ("crs") with the initial factors reordered: the scores equal
    the residual of the reference fit of the ``conv_order`` view, reordered back."""
    g = torch.Generator().manual_seed(2)
    for weight in (
        torch.randn(6, 10, 3, 3, generator=g),
        torch.randn(30, 2, 3, 3, generator=g),
    ):  # wide, tall
        scores = yopo({"c": weight}, rank=3, iters=ITERS, seed=1, conv_order=conv_order)["c"]
        x = to_reduction_view(weight, conv_order).abs() / _median_scale(weight)
        tall = x.shape[0] > x.shape[1]
        xo = (x.T if tall else x)[None].contiguous()
        v0, h0 = nmf_init(xo, 3, torch.Generator().manual_seed(_layer_seed(1, "c")))
        v, h = nmf_ref(xo, v0, h0, torch.tensor([xo.shape[1:]], dtype=torch.int32), ITERS)
        residual = (xo[0] - v[0] @ h[0]).abs()
        expected = from_reduction_view(residual.T if tall else residual, weight.shape, conv_order)
        torch.testing.assert_close(scores, expected, rtol=1e-4, atol=1e-5)


def test_median_is_the_lower_median_of_abs_weights():
    from knsparse.pruning.score.yopo import _median_abs

    for n in (1, 2, 7, 1000, 1001):
        w = torch.randn(n, generator=torch.Generator().manual_seed(n))
        assert _median_abs(w) == float(w.abs().median())
