import math

import pytest
import torch
from torch import nn

from knsparse.pruning import spectral


def noise_plus_spikes(rows, cols, sigma2, spike_strengths, seed=0):
    """iid N(0, σ²) noise plus orthogonal rank-one spikes of singular value ``strength · σ+``."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, cols, generator=g, dtype=torch.float64) * math.sqrt(sigma2)
    k = len(spike_strengths)
    if k:
        u = torch.linalg.qr(torch.randn(rows, k, generator=g, dtype=torch.float64))[0]
        v = torch.linalg.qr(torch.randn(cols, k, generator=g, dtype=torch.float64))[0]
        edge = math.sqrt(sigma2) * (math.sqrt(rows) + math.sqrt(cols))
        w = w + (u * torch.tensor(spike_strengths, dtype=torch.float64) * edge) @ v.T
    return w.float()


@pytest.mark.parametrize("q", [0.1, 0.45, 1.0])
def test_cdf_is_the_integral_of_the_density(q):
    hi = (1 + math.sqrt(q)) ** 2
    x = torch.linspace(0, hi * 1.1, 400_001, dtype=torch.float64)
    dens = spectral.mp_pdf(x, q)
    integral = torch.cumulative_trapezoid(dens, x)
    # the density has integrable square-root singularities at the edges (q = 1: 1/√x at 0)
    tol = 2e-3 if q == 1.0 else 1e-4
    assert torch.allclose(integral, spectral.mp_cdf(x[1:], q), atol=tol)
    assert spectral.mp_cdf(torch.tensor([0.0, hi * 2]), q).tolist() == pytest.approx([0.0, 1.0], abs=1e-12)


@pytest.mark.parametrize("q", [0.05, 0.5, 1.0])
def test_quantile_inverts_cdf(q):
    p = torch.linspace(0.001, 0.999, 97, dtype=torch.float64)
    x = spectral.mp_quantile(p, q)
    assert torch.allclose(spectral.mp_cdf(x, q), p, atol=1e-10)
    assert torch.all(x[1:] > x[:-1])


@pytest.mark.parametrize(
    "rows, cols, sigma2, spikes",
    [
        (300, 900, 4e-4, [1.5, 2.0, 3.0, 5.0]),  # wide (fc1-like)
        (900, 300, 1e-2, [2.0, 2.5]),  # tall (fc2-like)
        (400, 400, 1.0, [1.6, 2.2, 4.0]),  # square (q = 1, hard lower edge)
        (64, 576, 2e-3, [2.0]),  # conv-like [Cout, Cin*3*3], few rows
    ],
)
def test_recovers_sigma2_and_exact_spike_count(rows, cols, sigma2, spikes):
    for seed in range(3):
        fit = spectral.mp_fit(noise_plus_spikes(rows, cols, sigma2, spikes, seed))
        assert fit.sigma2 == pytest.approx(sigma2, rel=0.05)
        assert fit.num_spikes == len(spikes)
        assert fit.aspect_ratio == pytest.approx(min(rows, cols) / max(rows, cols))
        assert fit.sigma_plus == pytest.approx(math.sqrt(fit.n * fit.lambda_plus))
        assert fit.lambda_plus < fit.edge
        assert fit.bulk_fraction == pytest.approx(1 - len(spikes) / fit.m, abs=0.01)


def test_pure_noise_is_all_bulk():
    for seed, (rows, cols) in enumerate([(256, 1024), (700, 350), (500, 500)]):
        fit = spectral.mp_fit(noise_plus_spikes(rows, cols, 0.02, [], seed))
        assert fit.num_spikes == 0
        assert fit.bulk_fraction == pytest.approx(1.0, abs=0.005)
        assert fit.bulk_energy == pytest.approx(1.0, abs=0.005)
        assert fit.sigma2 == pytest.approx(0.02, rel=0.05)
        assert fit.fit_error < 0.05


def test_fit_error_flags_heavy_tails_and_low_rank():
    g = torch.Generator().manual_seed(0)
    gaussian = spectral.mp_fit(torch.randn(300, 600, generator=g))
    torch.manual_seed(0)
    heavy = torch.distributions.StudentT(1.5).sample((300, 600))
    low_rank = torch.randn(300, 20, generator=g) @ torch.randn(20, 600, generator=g)
    low_rank += 0.01 * torch.randn(300, 600, generator=g)
    assert spectral.mp_fit(heavy).fit_error > 3 * gaussian.fit_error
    structured = spectral.mp_fit(low_rank)
    assert structured.num_spikes == 20
    assert structured.bulk_energy < 0.05


@pytest.mark.parametrize("shape", [(300, 120), (120, 300), (200, 200)])
def test_cpu_eigenvalues_match_fp64_svd_on_an_ill_conditioned_matrix(shape):
    """Rank-10 signal far above a noise floor (λmax/λmin 1e9, 1e13 when square): the fp64 Gram
    route is backward stable in fp64 (error ~1e-16·λmax) and 100x more accurate than an fp32 SVD
    on the smallest eigenvalues."""
    g = torch.Generator().manual_seed(0)
    rows, cols = shape
    w = torch.randn(rows, 10, generator=g) @ torch.randn(10, cols, generator=g) * 10
    w += 1e-2 * torch.randn(rows, cols, generator=g)
    truth = (torch.linalg.svdvals(w.double()) ** 2 / max(shape)).flip(0)
    got = spectral.batch_eigenvalues(w.unsqueeze(0))[0]
    assert got.dtype == torch.float64 and got.shape == (min(shape),)
    assert torch.all(got[1:] >= got[:-1])
    assert (got - truth).abs().max() < 1e-14 * truth[-1]
    fp32_svd = (torch.linalg.svdvals(w) ** 2 / max(shape)).double().flip(0)
    assert ((fp32_svd - truth).abs() / truth).max() > 100 * ((got - truth).abs() / truth).max()


def test_conv_weight_is_fitted_as_cout_by_cin_k_k():
    w = noise_plus_spikes(64, 32 * 9, 0.01, [3.0]).reshape(64, 32, 3, 3)
    fit = spectral.mp_fit(w)
    assert (fit.rows, fit.cols) == (64, 288)
    assert fit.num_spikes == 1


def test_batched_fit_equals_single_fits():
    ws = torch.stack([noise_plus_spikes(120, 300, 0.1, [2.0] * s, seed=s) for s in range(3)])
    batched = spectral.mp_fit_batch(ws)
    for w, fit in zip(ws, batched, strict=True):
        single = spectral.mp_fit(w)
        assert fit.num_spikes == single.num_spikes
        assert fit.sigma2 == pytest.approx(single.sigma2, rel=1e-4)
        assert fit.fit_error == pytest.approx(single.fit_error, abs=1e-4)


def test_zero_matrix_gives_a_finite_degenerate_fit():
    fit = spectral.mp_fit(torch.zeros(16, 32))
    assert fit.sigma2 == 0.0
    assert fit.num_spikes == 0
    assert math.isfinite(fit.fit_error)


@pytest.mark.parametrize("bad", [torch.full((8, 8), float("nan")), torch.ones(2, 3, 4)])
def test_bad_weights_raise(bad):
    with pytest.raises(ValueError, match="weight|w must be"):
        spectral.mp_fit(bad)


@pytest.mark.parametrize("bad", [torch.ones(3, 4), [], [torch.ones(3, 4), torch.ones(4, 3)]])
def test_batch_eigenvalues_rejects_mixed_or_missing_shapes(bad):
    with pytest.raises(ValueError, match="shape"):
        spectral.batch_eigenvalues(bad)


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 16, 3)
        self.depthwise = nn.Conv2d(16, 16, 3, groups=16)
        self.a = nn.Linear(48, 96)
        self.b = nn.Linear(48, 96)
        self.head = nn.Linear(96, 10)


def test_diagnose_one_row_per_layer_batched_by_shape_with_plots(tmp_path, monkeypatch):
    model = TwoBlocks()
    calls = []
    real = spectral.batch_eigenvalues

    def counting(ws):
        calls.append((len(ws), *ws[0].shape))
        return real(ws)

    monkeypatch.setattr(spectral, "batch_eigenvalues", counting)
    rows = spectral.diagnose(model, tmp_path, progress=False)
    assert [r.name for r in rows] == ["stem", "a", "b", "head"]
    assert sorted(calls) == sorted([(1, 16, 27), (2, 96, 48), (1, 10, 96)])
    assert rows[0].weight_shape == (16, 3, 3, 3)
    for r in rows:
        assert r.plot is not None and r.plot.stat().st_size > 1000
        assert r.plot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert r.eigenvalues.shape == (r.fit.m,)
        assert r.as_dict()["name"] == r.name
    same_as_alone = spectral.mp_fit(model.a.weight)
    assert rows[1].fit.sigma2 == pytest.approx(same_as_alone.sigma2, rel=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("shape", [(256, 640), (640, 256)])
def test_cuda_batched_fit_matches_cpu(shape):
    """Both devices take the fp64 Gram route: eigenvalues agree to fp64 rounding."""
    ws = torch.stack([noise_plus_spikes(*shape, 0.01, [2.0, 3.0], seed=s) for s in range(4)])
    cpu_eigs, gpu_eigs = spectral.batch_eigenvalues(ws), spectral.batch_eigenvalues(ws.cuda())
    assert gpu_eigs.device.type == "cpu" and gpu_eigs.dtype == torch.float64
    assert (gpu_eigs - cpu_eigs).abs().max() <= 1e-12 * cpu_eigs.max()
    for a, b in zip(spectral.mp_fit_batch(ws), spectral.mp_fit_batch(ws.cuda()), strict=True):
        assert a.num_spikes == b.num_spikes == 2
        assert a.sigma2 == pytest.approx(b.sigma2, rel=1e-9)


def test_cpu_eigenvalues_of_views_and_low_precision_weights():
    w = torch.randn(48, 80)
    expected = spectral.batch_eigenvalues([w.t().contiguous()])[0]
    assert torch.allclose(spectral.batch_eigenvalues([w.t()])[0], expected, rtol=1e-12)
    half = w.to(torch.bfloat16)
    exact = (torch.linalg.svdvals(half.double()) ** 2 / 80).flip(0)
    assert torch.allclose(spectral.batch_eigenvalues([half])[0], exact, rtol=1e-10)
