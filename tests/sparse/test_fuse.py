"""Fusing the MLP activation into the sparse fc1: same function on every path, undone by the
dense twin, carried through save/load and ONNX export."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import knsparse as ks
from knsparse.backends import REFERENCE
from knsparse.deploy.export import export_onnx
from knsparse.models import vit_tiny_digits
from knsparse.models.vit import Mlp
from knsparse.sparse.densify import dense_copy


def swapped_vit(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    model = vit_tiny_digits().eval()
    masks = {
        n: ks.nm_mask(m.weight.abs(), "2:4")
        for n, m in model.named_modules()
        if n.startswith("blocks.") and isinstance(m, nn.Linear)
    }
    ks.swap_modules(model, masks)
    return model


def test_fusing_keeps_the_function_and_moves_gelu_into_fc1():
    model, x = swapped_vit(), torch.randn(3, 1, 8, 8)
    before = model(x)
    fused = ks.fuse_activations(model)
    assert fused == {f"blocks.{i}.mlp.fc1": "gelu" for i in range(4)}
    for i in range(4):
        mlp = model.blocks[i].mlp
        assert mlp.fc1.activation == "gelu" and isinstance(mlp.act, nn.Identity)
        assert "activation='gelu'" in repr(mlp.fc1)
    assert torch.equal(model(x), before)
    assert ks.fuse_activations(model) == {}  # idempotent


def test_only_known_containers_sparse_fc1_and_exact_activations_are_fused():
    dense = vit_tiny_digits()
    assert ks.fuse_activations(dense) == {}  # fc1 still nn.Linear

    tanh = swapped_vit()
    tanh.blocks[0].mlp.act = nn.GELU(approximate="tanh")  # another function than the epilogue's
    assert "blocks.0.mlp.fc1" not in ks.fuse_activations(tanh)
    assert isinstance(tanh.blocks[0].mlp.act, nn.GELU)

    class LookAlike(nn.Module):  # same attribute names, unknown forward: may use act elsewhere
        def __init__(self) -> None:
            super().__init__()
            self.fc1 = ks.SparseLinear(8, 8)
            self.act = nn.GELU()

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.act(x) + self.fc1(x)

    assert ks.fuse_activations(LookAlike()) == {}

    relu = Mlp(8, 16)
    relu.act = nn.ReLU()
    relu.fc1 = ks.SparseLinear.from_dense(relu.fc1, ks.nm_mask(relu.fc1.weight.abs(), "2:4"))
    x = torch.randn(5, 8)
    before = relu(x)
    assert ks.fuse_activations(relu) == {"fc1": "relu"}
    assert torch.equal(relu(x), before)


def test_activation_argument_is_validated_and_applied_by_the_reference_backend():
    with pytest.raises(ValueError, match="activation must be one of"):
        ks.SparseLinear(8, 8, activation="tanh")
    w, x, b = torch.randn(6, 8), torch.randn(4, 8), torch.randn(6)
    assert torch.equal(REFERENCE.linear(x, w, b, "gelu"), F.gelu(F.linear(x, w, b)))
    assert torch.equal(REFERENCE.linear(x, w, b, "relu"), F.relu(F.linear(x, w, b)))
    with pytest.raises(ValueError, match="activation"):
        REFERENCE.linear(x, w, b, "silu")


def test_dense_copy_puts_the_activation_back():
    model, x = swapped_vit(), torch.randn(2, 1, 8, 8)
    ks.fuse_activations(model)
    twin = dense_copy(model)
    mlp = twin.blocks[2].mlp
    assert type(mlp.fc1) is nn.Linear and type(mlp.act) is nn.GELU and mlp.act.approximate == "none"
    assert torch.allclose(twin(x), model(x), atol=1e-6)
    assert isinstance(model.blocks[2].mlp.act, nn.Identity)  # the original is untouched


def test_save_and_load_carry_the_fused_activation(tmp_path):
    model, x = swapped_vit(), torch.randn(2, 1, 8, 8)
    ks.fuse_activations(model)
    path = tmp_path / "fused.safetensors"
    ks.save_sparse(model, path)
    loaded = ks.load_sparse(vit_tiny_digits().eval(), path)
    assert loaded.blocks[1].mlp.fc1.activation == "gelu" and isinstance(loaded.blocks[1].mlp.act, nn.Identity)
    assert torch.equal(loaded(x), model(x))

    wrong = vit_tiny_digits().eval()
    wrong.blocks[3].mlp.act = nn.ReLU()
    untouched = {n: type(m) for n, m in wrong.named_modules()}
    with pytest.raises(ValueError, match="blocks.3.mlp.fc1.*ReLU"):
        ks.load_sparse(wrong, path)
    assert {n: type(m) for n, m in wrong.named_modules()} == untouched


def test_fused_model_exports_with_parity(tmp_path):
    model = swapped_vit()
    ks.fuse_activations(model)
    result = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "fused.onnx")
    assert result.max_abs_diff["CPUExecutionProvider"] <= 1e-4
