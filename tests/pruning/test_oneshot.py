"""SparseGPT, Wanda and CAST's least-squares re-fit: the OBS algebra against brute force, masks,
bad calibration, sequential vs one-pass."""

import copy

import pytest
import torch
from torch import nn

from knsparse.core.masks import group_nonzeros, nm_mask, to_reduction_view
from knsparse.core.pattern import Pattern
from knsparse.pruning.calibration import InputStats, collect_input_stats
from knsparse.pruning.methods import Layer, obs, sparsegpt, wanda
from knsparse.pruning.methods.base import data_path_scores
from knsparse.pruning.methods.obs import (
    damped,
    inverse_cholesky,
    refit_in_mask,
    refit_in_mask_cg,
    refit_kept_weights,
    relative_output_error,
    sparsegpt_sweep,
    sparsegpt_sweep_ref,
)
from knsparse.pruning.prune import prune
from knsparse.pruning.spectral import mp_fit

P24 = Pattern.parse("2:4")


def data(rows, k, out, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(rows, k, generator=g, dtype=torch.float64) @ (
        torch.eye(k, dtype=torch.float64) + 0.5 * torch.randn(k, k, generator=g, dtype=torch.float64) / k**0.5
    )
    w = torch.randn(out, k, generator=g, dtype=torch.float64)
    return x, w


def output_error(w, new, x):
    return float(((w - new) @ x.T).square().sum())


def brute_force_refit(w, x, mask):
    """Per row: least squares over the kept columns, ``min ‖x_S ŵ_S − x w‖``."""
    new = torch.zeros_like(w)
    for i in range(w.shape[0]):
        s = mask[i].nonzero().squeeze(1)
        new[i, s] = torch.linalg.lstsq(x[:, s], x @ w[i]).solution
    return new


def test_refit_in_mask_is_the_least_squares_solution():
    x, w = data(200, 16, 6)
    h = x.T @ x
    mask = nm_mask(torch.rand(6, 16), P24)
    mask[0, :] = True  # rows with different numbers of kept entries are batched separately
    mask[1, 3] = False
    new = refit_in_mask(w, h, mask)
    assert torch.allclose(new, brute_force_refit(w, x, mask), atol=1e-9)
    assert not new[~mask].any()
    assert output_error(w, new, x) < output_error(w, w * mask, x)


def test_inverse_cholesky_is_the_upper_factor_of_the_inverse():
    x, _ = data(100, 24, 1, seed=4)
    h = damped(x.T @ x, 0.01, "fc")
    u = inverse_cholesky(h, "fc")
    assert torch.equal(u, u.triu()) and bool((u.diagonal() > 0).all())
    assert torch.allclose(u, torch.linalg.cholesky(torch.linalg.inv(h), upper=True), atol=1e-10)
    with pytest.raises(ValueError, match="layer 'fc'.*not positive definite"):
        inverse_cholesky(-h, "fc")


def test_conjugate_gradient_refit_reaches_the_least_squares_solution():
    x, w = data(300, 32, 12, seed=5)
    h = damped(x.T @ x, 0.01, "fc")
    mask = nm_mask(torch.rand(12, 32), P24)
    mask[0, :] = True  # rows with any number of kept entries share the iteration
    mask[1, :] = False
    mask[2, 5] = False
    exact = refit_in_mask(w, h, mask)
    start = w * mask
    solved = refit_in_mask_cg(w, h, mask, start, tol=0.0, max_iters=32)
    assert solved.dtype == torch.float32 and not solved[~mask].any()
    assert torch.allclose(solved.double(), exact, atol=1e-5)
    # Only the first guess's kept entries are used.
    noisy = start + 5.0 * ~mask
    assert torch.allclose(
        refit_in_mask_cg(w, h, mask, noisy, tol=0.0, max_iters=32).double(), exact, atol=1e-5
    )
    # A full mask keeps the dense weights: nothing to re-fit.
    full = torch.ones_like(mask)
    assert torch.allclose(refit_in_mask_cg(w, h, full).double(), w, atol=1e-6)


def test_conjugate_gradient_refit_default_tolerance_closes_the_gap_to_the_exact_fit():
    # Ill-conditioned inputs (a few features 30x larger, correlated): the default stopping rule
    # leaves the output error within 2% of the way from SparseGPT's sweep to the exact optimum.
    g = torch.Generator().manual_seed(6)
    scale = torch.ones(128, dtype=torch.float64)
    scale[:4] = 30.0
    x = torch.randn(1024, 128, generator=g, dtype=torch.float64)
    x = (
        x
        @ (
            torch.eye(128, dtype=torch.float64)
            + 0.5 * torch.randn(128, 128, generator=g, dtype=torch.float64) / 8
        )
    ) * scale
    w = torch.randn(64, 128, generator=g, dtype=torch.float64).float()
    h = damped(x.T @ x / 1024, 0.01, "fc")
    mask, swept = sparsegpt_sweep(w, inverse_cholesky(h, "fc"), P24)
    errors = [relative_output_error(w, v, h) for v in (swept, refit_in_mask(w, h, mask))]
    fitted = relative_output_error(w, refit_in_mask_cg(w, h, mask, swept), h)
    assert errors[1] <= fitted <= errors[1] + 0.02 * (errors[0] - errors[1])


def test_refit_kept_weights_solves_small_layers_exactly_and_large_ones_by_cg(monkeypatch):
    x, w = data(300, 32, 12, seed=8)
    h = damped(x.T @ x, 0.01, "fc")
    mask = nm_mask(torch.rand(12, 32), P24)
    start = w * mask
    assert torch.equal(refit_kept_weights(w, h, mask, start), refit_in_mask(w, h, mask).float())
    monkeypatch.setattr(obs, "EXACT_REFIT_FLOPS", 0)
    assert torch.equal(refit_kept_weights(w, h, mask, start), refit_in_mask_cg(w, h, mask, start))


def test_obs_sweep_is_exact_when_pruned_columns_come_first():
    # Removing weights one by one with OBS updates of all remaining weights is the joint
    # least-squares optimum when no kept weight lies left of a pruned one.
    x, w = data(300, 12, 5, seed=1)
    u = inverse_cholesky(x.T @ x, "fc")
    mask = torch.zeros(5, 12, dtype=torch.bool)
    for i, p in enumerate([4, 6, 3, 8, 0]):
        mask[i, p:] = True
    _, new = sparsegpt_sweep(w, u, P24, mask=mask, blocksize=4)
    assert torch.allclose(new, brute_force_refit(w, x, mask), atol=1e-8)


@pytest.mark.parametrize("spec", ["2:4", "4:8", "8:16"])
def test_blocked_sweep_equals_the_column_by_column_reference(spec):
    pattern = Pattern.parse(spec)
    x, w = data(400, 64, 10, seed=2)
    u = inverse_cholesky(damped(x.T @ x, 0.01, "fc"), "fc")
    ref_mask, ref_new = sparsegpt_sweep_ref(w, u, pattern)
    for blocksize in (pattern.n, 32, 128):
        mask, new = sparsegpt_sweep(w, u, pattern, blocksize=blocksize)
        assert torch.equal(mask, ref_mask)
        assert torch.allclose(new, ref_new, atol=1e-10)
    assert bool((group_nonzeros(ref_mask, pattern) == pattern.k).all())
    # Reconstruction beats masking the same entries, and the re-fit in that mask beats both.
    exact = refit_in_mask(w, x.T @ x, ref_mask)
    assert output_error(w, exact, x) <= output_error(w, ref_new, x) < output_error(w, w * ref_mask, x)


def layer_with_stats(x, w, name="fc", n=4):
    xf = x.float()
    blocks = xf.reshape(xf.shape[0], -1, n)
    stats = InputStats(
        x.shape[0],
        x.square().sum(0),
        torch.einsum("tgi,tgj->gij", blocks, blocks).double(),
        x.T @ x,
        x.shape[0],
    )
    return Layer(name, w.float(), False, mp_fit(w.float()), stats)


def test_sparsegpt_and_wanda_methods():
    x, w = data(256, 32, 16, seed=3)
    lay = layer_with_stats(x, w)
    d = sparsegpt({"fc": lay}, P24)["fc"]
    assert bool((group_nonzeros(d.mask, P24) == 2).all()) and not d.weight[~d.mask].any()
    wd = wanda({"fc": lay}, P24, None)["fc"]
    assert torch.equal(wd.mask, nm_mask(data_path_scores(lay, 0.0), P24))
    # SparseGPT's reconstruction loses less output than Wanda's mask alone on the same data.
    assert output_error(w, d.weight.double(), x) < output_error(w, w * wd.mask, x)
    assert 0 < d.extra["output_error"] < 1
    refit = sparsegpt({"fc": lay}, P24, refit=True)["fc"]
    assert torch.equal(refit.mask, d.mask) and refit.extra["output_error"] <= d.extra["output_error"]
    unstructured = wanda({"fc": lay}, None, 0.75)["fc"].mask
    assert int(unstructured.sum()) == 128


def test_bad_calibration_names_the_layer():
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    before = copy.deepcopy(model.state_dict())
    bad = [torch.full((4, 8), float("nan"))]
    with pytest.raises(ValueError, match=r"layer '0'.*NaN"):
        prune(model, "sparsegpt", "2:4", calib=bad, progress=False)
    with pytest.raises(ValueError, match="damp must be >= 0"):
        prune(model, "sparsegpt", "2:4", calib=[torch.randn(16, 8)], progress=False, damp=-1.0)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_thin_calibration_falls_back_per_layer_with_the_reason():
    # 3 rows for a 32x32 Gram: the sweep runs on the damped Gram, the re-fit is skipped.
    x, w = data(3, 32, 4)
    lay = layer_with_stats(x, w)
    swept = sparsegpt({"fc": lay}, P24)["fc"]
    thin = sparsegpt({"fc": lay}, P24, refit=True)["fc"]
    assert thin.rule == "sparsegpt 2:4" and torch.equal(thin.weight, swept.weight)
    assert thin.fallback == "re-fit skipped: 3 calibration rows for a 32x32 Gram (a re-fit needs 32): " + (
        "SparseGPT's swept weights"
    )
    assert swept.fallback is None  # plain sparsegpt never re-fits: nothing was left out
    x, w = data(32, 32, 4)
    full = sparsegpt({"fc": layer_with_stats(x, w)}, P24, refit=True)["fc"]
    assert full.rule == "sparsegpt 2:4 + refit" and full.fallback is None
    # All-zero inputs: the scorer alone (magnitude: no input energy to weigh by), in the report;
    # the next layer sees ReLU(bias), not zero.
    model = nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 8))
    result = prune(model, "sparsegpt-refit", "2:4", calib=[torch.zeros(16, 8)], progress=False)
    zero = result.fallbacks()
    assert set(zero) == {"0"} and "all zero" in zero["0"] and "magnitude mask" in zero["0"]
    w0 = to_reduction_view(model[0].weight.detach(), "rsc")
    assert torch.equal(result.masks["0"], nm_mask(w0.abs(), P24))
    assert "fallback: layer '0'" in result.table()
    # CAST: too few rows for the re-fit keep CAST's mask on the dense weights.
    wide = nn.Sequential(nn.Linear(64, 8))
    calib = [torch.randn(4, 64)]
    cast = prune(wide, "cast", "2:4", calib=calib, progress=False)
    plain = prune(wide, "cast", "2:4", calib=calib, progress=False, reconstruct=False)
    assert torch.equal(cast.masks["0"], plain.masks["0"])
    assert torch.equal(cast.model[0].weight, plain.model[0].weight)
    assert (
        cast.report[0].fallback.endswith("CAST's mask on the dense weights")
        and "+ refit" not in cast.report[0].rule
    )
    assert plain.report[0].fallback is None


class ConvNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(8, 16, 3, padding=1)
        self.conv2 = nn.Conv2d(16, 16, 3, padding=1)
        self.fc = nn.Linear(16, 8)

    def forward(self, x):
        return self.fc(torch.relu(self.conv2(torch.relu(self.conv1(x)))).mean((2, 3)))


def test_sparsegpt_conv_masks_are_tensorrt_eligible_and_reduce_the_output_error():
    torch.manual_seed(0)
    model = ConvNet()
    calib = [torch.randn(8, 8, 6, 6) for _ in range(3)]
    result = prune(model, "sparsegpt", "2:4", calib=calib, progress=False)
    for name in ("conv1", "conv2"):
        mask = result.masks[name]
        # TensorRT: 2 of every 4 consecutive input channels at each kernel position (r, s).
        groups = mask.permute(0, 2, 3, 1).reshape(16, 3, 3, -1, 4).sum(-1)
        assert bool((groups == 2).all())
    # Layer 1 (dense inputs in both runs): reconstruction beats the mask alone on the calibration set.
    stats = collect_input_stats(model, {"conv1": model.conv1}, calib, full_gram=True)["conv1"]
    h = stats.gram
    w = to_reduction_view(model.conv1.weight.detach(), "rsc").double()
    new = to_reduction_view(result.model.conv1.weight.detach(), "rsc").double()
    mask = to_reduction_view(result.masks["conv1"], "rsc")
    err = lambda v: float((((w - v) @ h) * (w - v)).sum())  # noqa: E731
    assert err(new) < err(w * mask)


def test_sequential_calibrates_on_the_pruned_layers_and_matches_one_pass_on_the_first():
    torch.manual_seed(1)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 32), nn.GELU(), nn.Linear(32, 8))
    calib = [torch.randn(64, 16) for _ in range(2)]
    one = prune(model, "sparsegpt", "2:4", calib=calib, progress=False)
    seq = prune(model, "sparsegpt", "2:4", calib=calib, progress=False, sequential=True)
    assert torch.equal(one.model[0].weight, seq.model[0].weight)
    assert not torch.equal(one.model[2].weight, seq.model[2].weight)
    # Sequential layer 2 is the one-pass method applied to the pruned layer 0's outputs.
    with torch.no_grad():
        pruned_inputs = [seq.model[1](seq.model[0](b)) for b in calib]
    expect = prune(
        nn.Sequential(copy.deepcopy(model[2])), "sparsegpt", "2:4", calib=pruned_inputs, progress=False
    )
    assert torch.allclose(expect.model[0].weight, seq.model[2].weight, atol=1e-6)
    x = torch.cat(calib)
    dense = model(x)
    with torch.no_grad():
        for result in (one, seq):
            assert torch.nn.functional.cosine_similarity(result.model(x), dense).mean() > 0.8
    with pytest.raises(ValueError, match="sequential=True"):
        prune(model, "magnitude", "2:4", calib=calib, progress=False, sequential=True)


def test_cast_reconstruct_and_permutation_compose():
    torch.manual_seed(2)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8))
    calib = [torch.randn(64, 16) for _ in range(2)]
    plain = prune(model, "cast", "2:4", calib=calib, progress=False, reconstruct=False)
    refit = prune(model, "cast", "2:4", calib=calib, progress=False, reconstruct=True)
    assert all(torch.equal(plain.masks[n], refit.masks[n]) for n in plain.masks)
    assert refit.report[0].rule.endswith("+ refit")
    x = torch.cat(calib)
    with torch.no_grad():
        dense = model(x)
        gap = lambda r: float((r.model(x) - dense).square().mean())  # noqa: E731
        assert gap(refit) < gap(plain)
    for method in ("wanda", "sparsegpt"):
        permuted = prune(model, method, "2:4", calib=calib, progress=False, permute=True)
        assert permuted.permutation is not None
        assert all(bool((group_nonzeros(m, P24) == 2).all()) for m in permuted.masks.values())


@pytest.mark.gpu
def test_sweep_and_refit_on_cuda_match_the_cpu():
    x, w = data(512, 128, 48, seed=7)
    h = damped(x.T @ x / 512, 0.01, "fc")
    w = w.float()
    cpu = sparsegpt_sweep(w, inverse_cholesky(h, "fc"), P24)
    gpu = sparsegpt_sweep(w.cuda(), inverse_cholesky(h.cuda(), "fc"), P24)
    assert (gpu[0].cpu() != cpu[0]).float().mean() < 0.01  # float32 rounding may flip near-ties
    cpu_fit = refit_in_mask_cg(w, h, cpu[0], cpu[1])
    gpu_fit = refit_in_mask_cg(w.cuda(), h.cuda(), cpu[0].cuda(), cpu[1].cuda())
    assert gpu_fit.is_cuda
    errors = [relative_output_error(w, v.cpu(), h) for v in (cpu_fit, gpu_fit)]
    assert errors[1] == pytest.approx(errors[0], rel=1e-3)
