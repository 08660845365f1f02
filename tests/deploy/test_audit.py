"""Throughput audit: structure, honesty on CPU, identical weights, outputs written.

No assertion here depends on how fast anything ran.
"""

from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from knsparse import swap_modules
from knsparse.core.masks import apply_masks, nm_mask
from knsparse.deploy.audit import CPU_NOTE, Spread, _check_identical, audit
from knsparse.models import vit_tiny_digits
from knsparse.sparse.densify import dense_copy
from knsparse.sparse.modules import sparse_layers

FAST = {"repeats": 3, "warmup": 1, "min_time_s": 0.002, "progress": False}


def _model_and_masks(pattern: str = "2:4"):
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    masks = {
        n: nm_mask(m.weight.abs(), pattern)
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("blocks")
    }
    return model, masks


def test_cpu_audit_says_it_measured_the_reference_path(tmp_path):
    model, masks = _model_and_masks()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = audit(model, (1, 8, 8), batch_sizes=(1, 4), plan=masks, checkpoint="vit-digits", **FAST)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items()) and not sparse_layers(model)
    assert [r.batch for r in result.rows] == [1, 4]
    assert CPU_NOTE in result.notes and any("float32 on CPU" in n for n in result.notes)
    for row in result.rows:
        assert row.status == "reference path (no sparse tensor cores)"
        assert row.endpoint == "torch eager, float32" and row.checkpoint == "vit-digits"
        assert row.dense_ips.q10 <= row.dense_ips.median <= row.dense_ips.q90
        assert row.speedup.median > 0
    layers = {layer.name: layer for layer in result.layers}
    assert layers["blocks.0.mlp.fc1"].backend == "reference"
    assert layers["patch_embed.proj"].backend is None and layers["patch_embed.proj"].reason == "no mask"
    assert result.max_abs_diff < 1e-6 and result.dtype == "float32"

    paths = result.save(tmp_path)
    text = paths["markdown"].read_text()
    assert "no sparse tensor cores were measured" in text
    assert "| checkpoint | endpoint | batch | dense im/s | sparse im/s | speedup | status |" in text
    data = json.loads(paths["json"].read_text())
    assert {"device", "versions", "commit"} <= set(data["environment"]) and len(data["rows"]) == 2
    assert paths["png"].stat().st_size > 1000


def test_fused_activations_in_the_sparse_copy_only():
    model, masks = _model_and_masks()
    result = audit(model, (1, 8, 8), batch_sizes=(2,), plan=masks, fuse_activations=True, **FAST)
    assert any("fused into the sparse fc1 of 4 MLP block(s)" in n for n in result.notes)
    assert result.max_abs_diff < 1e-6
    assert not sparse_layers(model) and isinstance(model.blocks[0].mlp.act, nn.GELU)  # input untouched


def test_swapped_and_zero_holding_models_are_audited_from_their_own_sparsity():
    model, masks = _model_and_masks("4:8")
    swap_modules(model, masks, pattern="4:8")
    result = audit(model, (1, 1, 8, 8), batch_sizes=(2,), tome_r=2, **FAST)
    assert result.pattern == "4:8" and result.merges_per_block == [2, 2, 2, 2]
    assert sum(layer.backend == "reference" for layer in result.layers) == len(masks)

    dense_with_zeros = dense_copy(model)
    inferred = audit(dense_with_zeros, (1, 8, 8), batch_sizes=(1,), pattern="4:8", **FAST)
    assert {layer.name for layer in inferred.layers if layer.backend} == set(masks)


def test_nothing_to_audit_and_bad_arguments():
    model, masks = _model_and_masks()
    with pytest.raises(ValueError, match="nothing to audit"):
        audit(model, (1, 8, 8), batch_sizes=(1,), **FAST)
    with pytest.raises(ValueError, match="input_shape"):
        audit(model, (8, 8), plan=masks, **FAST)
    with pytest.raises(ValueError, match="batch_sizes"):
        audit(model, (1, 8, 8), batch_sizes=(0,), plan=masks, **FAST)
    swap_modules(model, {k: v for k, v in masks.items() if "mlp" in k})
    other = {k: nm_mask(model.get_submodule(k).weight.abs(), "1:4") for k in masks if "attn" in k}
    swap_modules(model, other, pattern="1:4")
    with pytest.raises(ValueError, match="mixes sparse patterns"):
        audit(model, (1, 8, 8), **FAST)


def test_weight_mismatch_is_refused():
    model, masks = _model_and_masks()
    dense = dense_copy(model)
    apply_masks(dense, masks)
    sparse = dense_copy(dense)
    swap_modules(sparse, masks)
    _check_identical(dense, sparse)
    with torch.no_grad():
        dense.blocks[1].mlp.fc1.weight.mul_(1.5)
    with pytest.raises(RuntimeError, match=r"blocks\.1\.mlp\.fc1"):
        _check_identical(dense, sparse)


def test_spread_quantiles():
    s = Spread.of([float(v) for v in range(1, 12)])
    assert (s.median, s.q10, s.q90) == (6.0, 2.0, 10.0)
    assert Spread.of([3.0]) == Spread(3.0, 3.0, 3.0)


@pytest.mark.gpu
def test_gpu_audit_runs_sparse_backends_in_half_precision():
    model, masks = _model_and_masks()
    result = audit(model, (1, 8, 8), batch_sizes=(1, 32), plan=masks, **FAST)
    assert result.dtype == "float16" and CPU_NOTE not in result.notes
    assert all(r.status in ("faster", "slower", "no clear difference") for r in result.rows)
    assert result.max_abs_diff < 1e-2
