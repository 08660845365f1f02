"""Repair: ASR's per-channel γ against a direct computation, folding, edge cases, the
layer-wise baseline and BatchNorm recalibration."""

import copy

import pytest
import torch
from torch import nn

from knsparse.pruning import repair


def _chain(seed: int = 0) -> nn.Sequential:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 6)).eval()


def _pruned(dense: nn.Module, keep: float = 0.4, seed: int = 1) -> nn.Module:
    model = copy.deepcopy(dense)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                m.weight.mul_(torch.rand(m.weight.shape, generator=g) < keep)
    return model


def _calib(seed: int = 2, shape: tuple[int, ...] = (32, 8)) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=g) for _ in range(3)]


def _variances(layer_input: torch.Tensor, layer: nn.Linear) -> torch.Tensor:
    return layer(layer_input).detach().double().var(dim=0, unbiased=False)


def test_asr_gamma_matches_the_formula_for_the_first_layer() -> None:
    dense = _chain()
    model = _pruned(dense)
    calib = _calib()
    x = torch.cat(calib)
    v_d, v_p = _variances(x, dense[0]), _variances(x, model[0])
    lam = float(v_p.median())
    s = v_p / (v_p + lam)
    want = s * (v_d / v_p).sqrt() + (1 - s)
    w0, b0 = model[0].weight.detach().clone(), model[0].bias.detach().clone()
    report = repair.asr(model, dense, calib)
    torch.testing.assert_close(report.gammas["0"].double(), want, rtol=1e-5, atol=1e-6)
    assert report.lam["0"] == pytest.approx(lam, rel=1e-6)
    g = want.float()
    torch.testing.assert_close(model[0].weight, w0 * g[:, None])
    torch.testing.assert_close(model[0].bias, b0 * g)
    assert torch.equal(model[0].weight == 0, w0 == 0)  # the mask does not move


def test_asr_is_sequential_and_restores_variances_without_shrinkage() -> None:
    dense = _chain(3)
    model = _pruned(dense, seed=4)
    calib = _calib(5)
    repair.asr(model, dense, calib, shrinkage="none")
    x = torch.cat(calib)
    hidden_d, hidden_p = dense[1](dense[0](x)), model[1](model[0](x))
    torch.testing.assert_close(
        _variances(hidden_p, model[2]), _variances(hidden_d, dense[2]), rtol=1e-4, atol=1e-7
    )


def test_explicit_lambda_and_layerwise_baseline() -> None:
    dense = _chain(6)
    calib = _calib(7)
    x = torch.cat(calib)
    model = _pruned(dense, seed=8)
    v_d, v_p = _variances(x, dense[0]), _variances(x, model[0])
    report = repair.asr(model, dense, calib, lam=0.5)
    s = v_p / (v_p + 0.5)
    torch.testing.assert_close(
        report.gammas["0"].double(), s * (v_d / v_p).sqrt() + 1 - s, rtol=1e-5, atol=1e-6
    )
    model = _pruned(dense, seed=8)
    report = repair.layerwise(model, dense, calib)
    gamma = report.gammas["0"]
    assert torch.all(gamma == gamma[0])
    assert float(gamma[0]) == pytest.approx(float((v_d.sum() / v_p.sum()).sqrt()), rel=1e-5)


def test_dead_channels_get_gamma_one() -> None:
    dense = _chain(9)
    model = _pruned(dense, seed=10)
    with torch.no_grad():
        model[0].weight[3] = 0
        model[0].bias[3] = 0.7  # constant output: zero variance
        model[0].weight[5] = 0
        model[0].bias[5] = 0
    report = repair.asr(model, dense, _calib(11), shrinkage="none")
    gamma = report.gammas["0"]
    assert torch.isfinite(gamma).all()
    assert gamma[3] == 1 and gamma[5] == 1


def test_empty_calibration_raises_and_leaves_the_model_alone() -> None:
    dense = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)).eval()
    model = _pruned(dense)
    state = copy.deepcopy(model.state_dict())
    for call in (
        lambda: repair.asr(model, dense, []),
        lambda: repair.layerwise(model, dense, []),
        lambda: repair.recalibrate_bn(model, []),
        lambda: repair.apply(model, dense, [], "asr"),
    ):
        with pytest.raises(ValueError, match="no batches"):
            call()
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_recalibrate_bn_is_a_cumulative_average_and_restores_modes() -> None:
    torch.manual_seed(12)
    model = nn.Sequential(nn.Conv2d(3, 5, 3), nn.BatchNorm2d(5, momentum=0.3), nn.Dropout(0.5)).eval()
    calib = [torch.randn(4, 3, 6, 6) for _ in range(3)]
    assert repair.recalibrate_bn(model, calib) == 3
    bn = model[1]
    outs = [model[0](x).detach() for x in calib]
    mean = torch.stack([o.mean((0, 2, 3)) for o in outs]).mean(0)
    var = torch.stack([o.transpose(0, 1).reshape(5, -1).var(1, unbiased=True) for o in outs]).mean(0)
    torch.testing.assert_close(bn.running_mean, mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var, var, rtol=1e-5, atol=1e-6)
    assert bn.momentum == 0.3 and not bn.training and not model.training


def test_asr_then_bn_on_a_conv_net() -> None:
    torch.manual_seed(13)
    dense = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3),
        nn.AdaptiveAvgPool2d(1),
    ).eval()
    model = _pruned(dense, keep=0.5, seed=14)
    calib = [torch.randn(4, 3, 6, 6) for _ in range(2)]
    report = repair.apply(model, dense, calib, "asr")
    assert set(report.gammas) == {"0", "3"} and report.batches == 2
    assert repair.apply(model, dense, calib, "bn").method == "bn"


def test_bad_arguments() -> None:
    dense = _chain()
    with pytest.raises(ValueError, match="shrinkage"):
        repair.asr(_pruned(dense), dense, _calib(), shrinkage="mean")
    with pytest.raises(ValueError, match="lam"):
        repair.asr(_pruned(dense), dense, _calib(), lam=-1.0)
    with pytest.raises(ValueError, match="method must be one of"):
        repair.apply(_pruned(dense), dense, _calib(), "magic")
    other = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 7))
    with pytest.raises(ValueError, match="layer '2'"):
        repair.asr(_pruned(dense), other, _calib())


def test_bn_recalibration_undoes_a_per_channel_scale_of_the_conv_before_it() -> None:
    """Why ASR+BN cannot beat BN-only where every pruned layer feeds a BatchNorm: after
    recalibration the scaled channel is normalised again, so only BatchNorm's eps differs."""
    torch.manual_seed(15)
    dense = nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.BatchNorm2d(8)
    ).eval()
    pruned = _pruned(dense, keep=0.3, seed=16)
    calib = [torch.randn(8, 3, 6, 6) for _ in range(3)]
    asr_bn, bn_only = copy.deepcopy(pruned), copy.deepcopy(pruned)
    report = repair.apply(asr_bn, dense, calib, "asr")
    repair.apply(bn_only, dense, calib, "bn")
    assert any(not torch.allclose(g, torch.ones_like(g)) for g in report.gammas.values())
    asr_only = copy.deepcopy(pruned)
    repair.asr(asr_only, dense, calib)
    x = torch.randn(4, 3, 6, 6)
    with torch.no_grad():
        assert torch.allclose(asr_bn(x), bn_only(x), atol=1e-3)
        assert not torch.allclose(asr_only(x), bn_only(x), atol=1e-2)  # the recalibration did it
