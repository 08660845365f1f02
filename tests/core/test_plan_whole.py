"""Every stage reads the plan whole: its pattern with the conv order, its masks, the channel
permutation that was applied and the recipe — through the audit, the ONNX export, saving and
loading, fine-tuning and the backends' layer specs."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from untouched import assert_same, snapshot

import knsparse as ks
from knsparse.backends import KNSPARSE_CUDA, ConvSpec
from knsparse.deploy.onnx_check import read_metadata
from knsparse.models import vit_tiny_digits
from knsparse.sparse.io import saved_plan


class TwoConvs(nn.Module):
    """Two 3x3 convs (8 input channels each): groups of 4 along (R,S,C) and along (C,R,S) differ."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(8, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv2(torch.relu(self.conv1(x)))


@pytest.fixture
def convs() -> nn.Module:
    torch.manual_seed(0)
    return TwoConvs().eval()


def test_crs_plan_is_read_whole_by_swap_audit_and_macs(convs: nn.Module) -> None:
    """A "crs" plan used to lose its conv order in the audit (neither layer swapped)."""
    plan = ks.prune(convs, "magnitude", "2:4", conv_order="crs", progress=False).plan
    assert plan.pattern == ks.Pattern(2, 4, "crs") and str(plan.pattern) == "2:4/crs"
    assert not all(ks.is_nm(m, "2:4") for m in plan.masks.values())  # really another grouping
    swapped = ks.swap_modules(copy.deepcopy(convs), plan)
    result = ks.audit(convs, (8, 6, 6), batch_sizes=(1,), plan=plan, repeats=1, warmup=0, progress=False)
    assert set(swapped.swapped) == {"conv1", "conv2"}
    assert {s.name for s in result.layers if s.backend is not None} == {"conv1", "conv2"}
    assert result.pattern == "2:4/crs" and result.max_abs_diff < 1e-5
    report = ks.macs(convs, (8, 6, 6), plan=plan)
    assert report.sparse_total < report.dense_total


def test_backends_see_the_conv_order_and_skip_with_a_reason() -> None:
    spec = ConvSpec(
        8, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float16, ks.Pattern(2, 4, "crs"), torch.device("cuda")
    )
    assert "conv order 'crs'" in KNSPARSE_CUDA.conv_unsupported_reason(spec)
    one_by_one = ConvSpec(
        8, 8, (1, 1), (1, 1), (0, 0), (1, 1), 1, torch.float16, ks.Pattern(2, 4, "crs"), torch.device("cuda")
    )
    assert "conv order" not in (KNSPARSE_CUDA.conv_unsupported_reason(one_by_one) or "")


def test_export_records_any_kn_pattern_the_permutation_and_the_recipe(tmp_path: Path) -> None:
    pytest.importorskip("onnxruntime")
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    calib = [torch.randn(8, 1, 8, 8)]
    result = ks.prune(model, "magnitude", "8:16", calib=calib, permute={"max_iters": 1}, progress=False)
    plan = result.plan
    assert plan.permutation, "the tiny ViT has permutable groups"
    out = ks.export_onnx(model, calib[0][:2], tmp_path / "m.onnx", plan=plan)
    meta = read_metadata(out.path)
    layers = {r["layer"]: r for r in meta["layers"]}
    assert {n for n, r in layers.items() if r["pattern"] == "8:16"} == set(plan.masks)  # was "dense"
    assert meta["plan"]["pattern"] == "8:16" and meta["plan"]["conv_order"] == "rsc"
    assert meta["plan"]["permutation"] == [p.to_dict() for p in plan.permutation]
    assert ks.PruneConfig.from_dict(meta["plan"]["recipe"]) == result.config
    first = plan.permutation[0]
    consumer = next(name for name, role, _, _ in first.members if role == "consumer")
    assert layers[consumer]["permutation"] == list(first.order)


def test_saved_plan_round_trip(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    result = ks.prune(
        model, "magnitude", "2:4", calib=[torch.randn(4, 1, 8, 8)], permute=True, progress=False
    )
    ks.swap_modules(result.model, result.plan)
    ks.save_sparse(result.model, tmp_path / "p.safetensors", plan=result.plan)
    loaded = vit_tiny_digits().eval()
    ks.load_sparse(loaded, tmp_path / "p.safetensors")
    plan = saved_plan(loaded, tmp_path / "p.safetensors")
    assert plan.pattern == result.plan.pattern and plan.permutation == result.plan.permutation
    assert plan.recipe == result.plan.recipe
    assert all(torch.equal(plan.masks[n], m) for n, m in result.plan.masks.items())
    ks.save_sparse(result.model, tmp_path / "bare.safetensors")
    assert saved_plan(loaded, tmp_path / "bare.safetensors") is None


def test_finetune_takes_the_plan() -> None:
    torch.manual_seed(0)
    teacher = vit_tiny_digits().eval()
    result = ks.prune(teacher, "magnitude", "2:4", progress=False)
    x = torch.randn(16, 1, 8, 8)
    tuned = ks.finetune(result.model, teacher, x, epochs=1, plan=result.plan, batch_size=8, progress=False)
    assert set(tuned.masks) == set(result.plan.masks)
    for name, mask in result.plan.masks.items():
        assert not bool(tuned.model.get_submodule(name).weight[~mask].any()), name
    with pytest.warns(DeprecationWarning, match="finetune\\(masks=...\\) is now finetune\\(plan=...\\)"):
        ks.finetune(
            copy.deepcopy(result.model),
            teacher,
            x,
            epochs=1,
            masks=result.masks,
            batch_size=8,
            progress=False,
        )


def test_prune_converts_multihead_attention_in_the_model_it_returns() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)).eval()
    x = torch.randn(2, 5, 16)
    before = model(x)
    result = ks.prune(model, "magnitude", "2:4", progress=False)
    assert result.converted == ["1.self_attn"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in result.model.modules())
    assert {"1.self_attn.q_proj", "1.self_attn.out_proj"} <= set(result.masks)
    assert any(isinstance(m, nn.MultiheadAttention) for m in model.modules())  # the user's copy
    torch.testing.assert_close(model(x), before)


def test_inplace_failure_after_the_mha_conversion_restores_the_model() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.TransformerEncoderLayer(32, 4, 64, batch_first=True)).eval()
    before = snapshot(model)
    bad_calib = [torch.randn(2, 5, 7)]  # the wrong width: fails in the calibration pass
    with pytest.raises((ValueError, RuntimeError)):
        ks.prune(model, "wanda", "2:4", calib=bad_calib, inplace=True, progress=False)
    assert_same(before, snapshot(model))


@pytest.mark.parametrize("method", ["magnitude", "wanda", "sparsegpt-refit", "cast", "rmt", "yopo"])
def test_inplace_gives_what_a_copy_gives(method: str) -> None:
    """Methods read views of the weights (no copy under inplace=True): none may write to them."""
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    options = {"rank": 2, "iters": 5} if method == "yopo" else {}
    copied = ks.prune(model, method, "2:4", calib=calib, progress=False, **options)
    inplace = ks.prune(
        copy.deepcopy(model), method, "2:4", calib=calib, inplace=True, progress=False, **options
    )
    for name, mask in copied.masks.items():
        assert torch.equal(mask, inplace.masks[name]), name
    for (name, a), b in zip(
        copied.model.state_dict().items(), inplace.model.state_dict().values(), strict=True
    ):
        assert torch.equal(a, b), name


def test_diagnostics_run_only_when_asked() -> None:
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    calib = [torch.randn(8, 1, 8, 8)]
    plain = ks.prune(model, "wanda", "2:4", calib=calib, progress=False)
    assert all(r.mp is None and r.certified is None for r in plain.report)
    asked = ks.prune(
        model, "wanda", "2:4", calib=calib, diagnostics=ks.DiagnosticsConfig(spectra=True), progress=False
    )
    assert all(r.mp is not None and r.certified is None for r in asked.report)
    needs_fit = ks.prune(model, "rmt", "2:4", progress=False)  # rmt reads the fit itself
    assert all(r.rule == "rmt" for r in needs_fit.report)
    with pytest.raises(ValueError, match="sequential"):
        ks.PruneConfig(
            "wanda",
            calibration=ks.CalibrationConfig(True),
            diagnostics=ks.DiagnosticsConfig(certificate=True),
        )


def test_a_config_and_keywords_do_not_mix() -> None:
    config = ks.PruneConfig("magnitude", "2:4")
    model = vit_tiny_digits()
    with pytest.raises(TypeError, match="pass calib by keyword"):
        ks.prune(model, config, [torch.randn(2, 1, 8, 8)])
    with pytest.raises(TypeError, match="permute"):
        ks.prune(model, config, permute=True)
    assert json.loads(ks.prune(model, config, progress=False).to_json())["recipe"] == config.to_dict()
