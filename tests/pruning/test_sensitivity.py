"""Layer sensitivity (each layer's mask alone, against a by-hand reference) and
``keep_dense="auto"`` (a deliberately fragile layer is kept dense and the target is met; an
unreachable target says so and leaves the model as it was; the config is validated)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse.pruning.config import DenseTarget, PruneConfig
from knsparse.pruning.sensitivity import layer_sensitivity


def _fragile_mlp() -> nn.Sequential:
    """An MLP whose layer ``"2"`` is fragile: equal-magnitude weights, scaled up, that the head
    reads; layers ``"0"`` and ``"4"`` hold half their weights near zero in every group of 4, so
    2:4 magnitude masks barely move them."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 64), nn.ReLU(), nn.Linear(64, 64), nn.ReLU(), nn.Linear(64, 10))
    with torch.no_grad():
        for i in (0, 4):
            w = model[i].weight
            small = torch.zeros_like(w, dtype=torch.bool).reshape(-1, 4)
            small[:, 2:] = True
            w.masked_fill_(small.reshape(w.shape), 1e-4)
        model[2].weight.copy_(torch.sign(torch.randn(64, 64)) * 0.5)
    return model.eval()


def _calib(batches: int = 8, size: int = 32) -> list[torch.Tensor]:
    return [torch.randn(size, 16, generator=torch.Generator().manual_seed(i)) for i in range(batches)]


def _kl_agreement(dense: nn.Module, pruned: nn.Module, calib: list[torch.Tensor]) -> tuple[float, float]:
    x = torch.cat(calib)
    with torch.no_grad():
        p, q = dense(x).log_softmax(-1), pruned(x).log_softmax(-1)
    kl = float((p.exp() * (p - q)).sum(-1).mean())
    return kl, float((p.argmax(-1) == q.argmax(-1)).float().mean())


def test_sensitivity_matches_pruning_each_layer_by_hand() -> None:
    model, calib = _fragile_mlp(), _calib()
    result = ks.prune(model, "magnitude", calib=calib, progress=False)
    before = copy.deepcopy(model.state_dict())
    rows = layer_sensitivity(model, result, calib)
    assert rows[0].name == "2" and {r.name for r in rows} == {"0", "2", "4"}
    assert [r.kl for r in rows] == sorted((r.kl for r in rows), reverse=True)
    for row in rows:
        alone = copy.deepcopy(model)
        with torch.no_grad():
            alone.get_submodule(row.name).weight.mul_(result.masks[row.name])
        kl, agreement = _kl_agreement(model, alone, calib)
        assert row.kl == pytest.approx(kl, rel=1e-4, abs=1e-7) and row.agreement == pytest.approx(agreement)
        layer = model.get_submodule(row.name)
        assert row.macs == layer.in_features * layer.out_features and row.sparse_executable
    assert rows[0].kl > 100 * rows[1].kl  # the fragile layer stands out
    for k, v in model.state_dict().items():  # weights switched and put back exactly
        assert torch.equal(v, before[k])
    with pytest.raises(ValueError, match="layer 'nope'"):
        layer_sensitivity(model, {"nope": torch.ones(2, 2, dtype=torch.bool)}, calib)


def test_sensitivity_macs_are_what_ks_macs_counts() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 16, 3, groups=16, padding=1),
        nn.Conv2d(16, 32, 1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 8),
    ).eval()  # fmt: skip
    calib = [torch.randn(4, 4, 12, 12, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    result = ks.prune(model, "magnitude", calib=calib, progress=False)
    rows = {r.name: r for r in layer_sensitivity(model, result.plan, calib)}
    counted = {m.name: m.dense for m in ks.macs(model, (1, 4, 12, 12), result.plan).layers}
    assert set(rows) == set(result.masks) == {"0", "3", "7"}
    for name, row in rows.items():
        assert row.macs == counted[name]


def test_auto_keeps_the_fragile_layer_dense_and_meets_the_target() -> None:
    model, calib = _fragile_mlp(), _calib()
    plain = ks.prune(model, "magnitude", calib=calib, progress=False)
    _, agreement_all = _kl_agreement(model, plain.model, calib)
    assert agreement_all < 0.9  # pruning everything breaks the model
    result = ks.prune(
        model, "magnitude", calib=calib, progress=False, keep_dense="auto", target_agreement=0.97
    )
    auto = result.dense_target
    assert auto.kept_dense == ["2"] and auto.holdout == [3, 7]
    assert auto.agreement >= 0.97 and auto.agreement_before < 0.97 and auto.kl < auto.kl_before
    assert set(result.masks) == set(result.plan.masks) == {"0", "4"}
    assert [r.name for r in result.report] == ["0", "4"] and "keep_dense auto" in result.skipped["2"]
    assert torch.equal(result.model[2].weight, model[2].weight)  # dense again, not half-kept
    for name in ("0", "4"):
        assert torch.equal(result.masks[name], plain.masks[name])
        assert torch.equal(result.model.get_submodule(name).weight, plain.model.get_submodule(name).weight)
    held = [calib[3], calib[7]]  # the measured agreement is the held-out batches'
    kl, agreement = _kl_agreement(model, result.model, held)
    assert auto.agreement == pytest.approx(agreement) and auto.kl == pytest.approx(kl, rel=1e-4, abs=1e-7)
    total = 16 * 64 + 64 * 64 + 64 * 10
    assert auto.mac_share_before == pytest.approx(1.0)
    assert auto.mac_share == pytest.approx((16 * 64 + 64 * 10) / total)
    assert auto.sparse_execution_share == pytest.approx(auto.mac_share)  # all three layers swap
    assert "kept dense (1): 2" in result.table()
    assert result.as_dict()["dense_target"]["kept_dense"] == ["2"]
    assert result.config.to_dict()["dense_target"]["agreement"] == 0.97


def test_an_unreachable_target_says_so_and_leaves_the_model() -> None:
    model, calib = _fragile_mlp(), _calib()
    with torch.no_grad():  # every layer fragile: whichever stays sparse breaks the model
        for i in (0, 4):
            model[i].weight.copy_(torch.sign(torch.randn_like(model[i].weight)) * 0.5)
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=r"unreachable with one layer left sparse.*lower the target"):
        ks.prune(
            model, "magnitude", calib=calib, keep_dense="auto", target_agreement=0.99, inplace=True,
            progress=False,
        )  # fmt: skip
    target = DenseTarget(agreement=0.97, max_dense=0)
    with pytest.raises(ValueError, match=r"unreachable within max_dense=0.*raise max_dense"):
        ks.prune(model, "magnitude", calib=calib, keep_dense=target, inplace=True, progress=False)
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k])


def test_auto_with_a_repair_reports_after_it() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 16, 3, padding=1),
        nn.BatchNorm2d(16), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(16, 8),
    ).eval()  # fmt: skip
    calib = [torch.randn(8, 4, 8, 8, generator=torch.Generator().manual_seed(i)) for i in range(4)]
    result = ks.prune(
        model, "wanda", calib=calib, repair="bn", keep_dense="auto", target_kl=1.0, progress=False
    )
    auto = result.dense_target
    assert auto.holdout == [3] and auto.kl <= 1.0 and auto.kl_repaired is not None
    assert 0 <= auto.agreement_repaired <= 1 and result.repair is not None


def test_dense_target_is_validated() -> None:
    with pytest.raises(ValueError, match="needs a target"):
        DenseTarget()
    with pytest.raises(ValueError, match=r"target agreement must be in \(0, 1\]"):
        DenseTarget(agreement=1.5)
    with pytest.raises(ValueError, match="target kl must be >= 0"):
        DenseTarget(kl=-1.0)
    with pytest.raises(ValueError, match="holdout_every must be >= 2"):
        DenseTarget(kl=0.1, holdout_every=1)
    with pytest.raises(ValueError, match="keep_dense='auto' needs a target"):
        PruneConfig("wanda", keep_dense="auto")
    with pytest.raises(ValueError, match="needs a k:n pattern"):
        PruneConfig("magnitude", pattern="unstructured", sparsity=0.5, dense_target=DenseTarget(kl=0.1))
    config = PruneConfig("wanda", keep_dense="auto", dense_target=DenseTarget(agreement=0.9, max_dense=3))
    assert PruneConfig.from_json(config.to_json()) == config and config.needs_calibration
    model, calib = _fragile_mlp(), _calib()
    with pytest.raises(ValueError, match="pass that too"):
        ks.prune(model, "magnitude", calib=calib, target_agreement=0.9)
    with pytest.raises(ValueError, match="needs target_agreement"):
        ks.prune(model, "magnitude", calib=calib, keep_dense="auto")
    with pytest.raises(ValueError, match="calib has 1 batch"):
        ks.prune(model, "magnitude", calib=calib[:1], keep_dense="auto", target_kl=0.1)
    with pytest.raises(ValueError, match="needs a calibration set"):
        ks.prune(model, "magnitude", keep_dense="auto", target_kl=0.1)
