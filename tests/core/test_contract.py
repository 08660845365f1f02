"""The contract between the stages: the plan object, methods composed from stages, the family
registry, and every call leaving the user's model as it found it when it fails."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse.core.plan import ChannelPermutation, SparsityPlan, as_plan
from knsparse.integrations import families
from knsparse.models import resnet_tiny_digits, vit_tiny_digits
from knsparse.models.vit import Mlp
from knsparse.pruning.methods import METHODS, select
from knsparse.pruning.methods.base import Layer
from knsparse.pruning.methods.magnitude import magnitude_masks


def _state(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_state(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _calib(n: int = 2, batch: int = 8) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    return [torch.randn(batch, 1, 8, 8, generator=g) for _ in range(n)]


@pytest.fixture
def vit() -> nn.Module:
    torch.manual_seed(0)
    return vit_tiny_digits().eval()


# ---------------------------------------------------------------------------------------- plan


def test_prune_returns_a_plan_every_later_stage_takes(vit: nn.Module) -> None:
    result = ks.prune(vit, "magnitude", "2:4", progress=False)
    plan = result.plan
    assert isinstance(plan, SparsityPlan) and plan.pattern == ks.Pattern(2, 4) and plan.conv_order == "rsc"
    assert set(plan.masks) == set(result.masks)
    with pytest.raises(TypeError):
        plan.masks["head"] = torch.ones(1, dtype=torch.bool)  # read-only
    by_plan = ks.macs(result.model, (1, 8, 8), plan=plan)
    by_dict = ks.macs(result.model, (1, 8, 8), plan=result.masks, pattern="2:4")
    by_result = ks.macs(result.model, (1, 8, 8), plan=result)
    assert by_plan.sparse_total == by_dict.sparse_total == by_result.sparse_total < by_plan.dense_total
    a, b = copy.deepcopy(result.model), copy.deepcopy(result.model)
    assert ks.swap_modules(a, plan).swapped == ks.swap_modules(b, result.masks, "2:4").swapped
    x = torch.randn(3, 1, 8, 8)
    torch.testing.assert_close(a(x), b(x), rtol=0, atol=0)


def test_a_plan_and_a_contradicting_pattern_is_an_error(vit: nn.Module) -> None:
    plan = ks.prune(vit, "magnitude", "2:4", progress=False).plan
    with pytest.raises(ValueError, match="contradicts the plan's pattern 2:4"):
        ks.swap_modules(copy.deepcopy(vit), plan, pattern="8:16")
    with pytest.raises(ValueError, match="contradicts the plan's conv_order"):
        as_plan(plan, conv_order="crs")
    with pytest.raises(TypeError, match="unstructured prune has no k:n plan"):
        as_plan(ks.prune(vit, "magnitude", sparsity=0.5, progress=False))


def test_plan_validates_its_masks() -> None:
    with pytest.raises(ValueError, match="bool"):
        SparsityPlan(ks.Pattern(2, 4), {"fc": torch.full((2, 4), 2.0)})
    with pytest.raises(TypeError, match="torch.Tensor"):
        SparsityPlan(ks.Pattern(2, 4), {"fc": [[True]]})
    with pytest.raises(TypeError, match="knsparse.Pattern"):
        SparsityPlan("2:4", {})
    assert (
        SparsityPlan(ks.Pattern(2, 4), {"fc": torch.tensor([[1, 0, 1, 0]])}).masks["fc"].dtype == torch.bool
    )


def test_unstructured_travels_as_a_fraction(vit: nn.Module) -> None:
    result = ks.prune(vit, "magnitude", sparsity=0.5, progress=False)
    assert result.plan is None and result.pattern == "unstructured"
    same = ks.prune(vit, "magnitude", "unstructured", sparsity=0.5, progress=False)
    assert all(torch.equal(result.masks[n], same.masks[n]) for n in result.masks)
    for call in (
        lambda: ks.nm_mask(torch.rand(4, 8), "unstructured"),
        lambda: ks.swap_modules(vit, {}, pattern="unstructured"),
        lambda: ks.permute(vit, "unstructured"),
    ):
        with pytest.raises(ValueError, match="not a k:n pattern"):
            call()


# ------------------------------------------------------------------------------------- methods


def test_methods_are_scorer_budget_rule() -> None:
    """magnitude = score.magnitude under the select rule, for k:n and both unstructured budgets."""
    g = torch.Generator().manual_seed(1)
    weights = {n: torch.randn(8, 16, generator=g) for n in ("a", "b")}
    layers = {n: Layer(n, w, False, ks.spectral.mp_fit(w)) for n, w in weights.items()}
    scores = {n: lay.weight.abs() for n, lay in layers.items()}
    for pattern, sparsity, mode in (
        (ks.Pattern(2, 4), None, "layer"),
        (None, 0.6, "layer"),
        (None, 0.6, "global"),
    ):
        want = select(scores, pattern, sparsity, rule="magnitude", mode=mode)
        got = METHODS["magnitude"](layers, pattern, sparsity, mode=mode)
        assert all(torch.equal(want[n].mask, got[n].mask) for n in layers)
        assert [d.rule for d in want.values()] == [d.rule for d in got.values()]


def test_magnitude_masks_of_a_model_match_nm_mask() -> None:
    torch.manual_seed(0)
    model = resnet_tiny_digits()
    masks, skipped = magnitude_masks(model, ks.Pattern(2, 4))
    for name, mask in masks.items():
        weight = model.get_submodule(name).weight.detach()
        assert torch.equal(mask, ks.nm_mask(weight.abs(), "2:4"))
    assert "conv1" in skipped  # 1 input channel cannot carry 2:4 in (R,S,C) order


@pytest.mark.parametrize(("pattern", "sparsity"), [("2:4", None), (None, 0.6)])
def test_prune_with_yopo(vit: nn.Module, pattern: str | None, sparsity: float | None) -> None:
    result = ks.prune(vit, "yopo", pattern, sparsity, rank=2, iters=10, progress=False)
    assert result.report and all(r.rule.startswith("yopo") for r in result.report)
    if pattern:
        assert all(ks.is_nm(m, pattern) for m in result.masks.values())
    else:
        assert result.overall_sparsity() == pytest.approx(0.6, abs=0.01)
    name = "blocks.0.mlp.fc1"  # each layer's NMF start is seeded by its name
    scores = ks.score.yopo({name: vit.get_submodule(name).weight.detach()}, rank=2, iters=10)[name]
    if pattern:
        assert torch.equal(result.masks[name], ks.nm_mask(scores, "2:4"))


def test_prune_permute_takes_the_search_options(vit: nn.Module) -> None:
    bounded = ks.prune(
        vit, "magnitude", "2:4", permute={"max_iters": 1, "time_budget_s": 0.5}, progress=False
    )
    assert bounded.permutation is not None
    assert bounded.plan.permutation == bounded.permutation.applied() and bounded.plan.permutation
    for record in bounded.plan.permutation:  # the indices the model was permuted by, serialisable
        assert ChannelPermutation.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    x = torch.randn(2, 1, 8, 8)
    dense = copy.deepcopy(vit)
    with torch.no_grad():
        permuted = ks.permute(copy.deepcopy(vit), "2:4", max_iters=1, time_budget_s=0.5).model
        torch.testing.assert_close(permuted(x), dense(x), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match=r"unknown option.*for permute"):
        ks.prune(vit, "magnitude", "2:4", permute={"effort": 3}, progress=False)
    with pytest.raises(TypeError, match="permute must be"):
        ks.prune(vit, "magnitude", "2:4", permute="yes", progress=False)


# ------------------------------------------------------------------------------------ families


def test_a_new_family_is_one_entry(monkeypatch: pytest.MonkeyPatch) -> None:
    class MyMlp(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 16), nn.GELU(), nn.Linear(16, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    model = nn.Sequential(MyMlp()).eval()
    ks.swap_modules(model, {"0.fc1": ks.nm_mask(model[0].fc1.weight.abs(), "2:4")})
    assert ks.fuse_activations(model) == {}  # unknown family: left alone
    entry = families.Family("mine", mlp=(families.ClassRef(MyMlp.__module__, "MyMlp"),))
    monkeypatch.setattr(families, "FAMILIES", (*families.FAMILIES, entry))
    x = torch.randn(2, 8)
    before = model(x)
    assert ks.fuse_activations(model) == {"0.fc1": "gelu"}
    torch.testing.assert_close(model(x), before)


def test_family_matching_is_by_exact_class() -> None:
    class SubMlp(Mlp):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.fc1(x))  # skips act: fusing would change the function

    assert families.is_mlp(Mlp(8, 16)) and not families.is_mlp(SubMlp(8, 16))
    assert families.family_of(vit_tiny_digits().blocks[0], "vit_block").name == "knsparse"
    assert families.attention_parts(vit_tiny_digits().blocks[0].attn) is not None


# ----------------------------------------------------------------------- atomicity and modes


class _BadAfter(list):
    """Calibration batches whose ``fail_at``-th batch has the wrong number of channels."""


def _mixed_modes(model: nn.Module) -> dict[str, bool]:
    model.train()
    for m in model.modules():
        if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
            m.eval()  # frozen normalisation inside a training model
    return {n: m.training for n, m in model.named_modules()}


@pytest.mark.parametrize("build", [vit_tiny_digits, resnet_tiny_digits])
def test_a_failed_inplace_prune_leaves_the_model_as_it_was(build) -> None:
    torch.manual_seed(0)
    model = build()
    flags = _mixed_modes(model)
    before = _state(model)
    calib = [torch.randn(4, 1, 8, 8), torch.randn(4, 3, 8, 8)]  # the second batch is broken
    with pytest.raises((ValueError, RuntimeError)):
        ks.prune(
            model,
            "cast",
            "2:4",
            calib=calib,
            permute={"max_iters": 2},
            repair="bn",
            inplace=True,
            progress=False,
        )
    assert _same_state(before, _state(model))
    assert {n: m.training for n, m in model.named_modules()} == flags


@pytest.mark.parametrize("build", [vit_tiny_digits, resnet_tiny_digits])
def test_prune_and_repair_keep_every_training_flag(build) -> None:
    torch.manual_seed(0)
    model = build()
    flags = _mixed_modes(model)
    result = ks.prune(
        model,
        "magnitude",
        "2:4",
        calib=_calib(),
        permute={"max_iters": 2},
        repair="bn",
        inplace=True,
        progress=False,
    )
    assert result.model is model
    assert {n: m.training for n, m in model.named_modules()} == flags
    ks.repair.recalibrate_bn(model, _calib())
    assert {n: m.training for n, m in model.named_modules()} == flags


def test_swapped_modules_take_the_replaced_layers_mode(vit: nn.Module) -> None:
    masks, _ = magnitude_masks(vit, ks.Pattern(2, 4))
    ks.swap_modules(vit, masks)
    assert not any(m.training for m in vit.modules())


def test_export_takes_the_plan(vit: nn.Module, tmp_path) -> None:
    """A dense model and its plan give the k:n ONNX file directly; the model keeps its weights."""
    pytest.importorskip("onnxruntime")
    plan = ks.prune(vit, "magnitude", "2:4", progress=False).plan
    before = _state(vit)
    result = ks.export_onnx(vit, torch.randn(2, 1, 8, 8), tmp_path / "v.onnx", plan=plan)
    assert _same_state(before, _state(vit))
    kn = {r.layer for r in result.layers if r.pattern == "2:4"}
    assert set(plan.masks) <= kn
