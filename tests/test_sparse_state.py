"""Issue 13 class 1: a sparse layer computes with exactly the tensors it stores, however they
arrived (state-dict loads, ``.data`` assignment, in-place writes, moves, inference mode), and a
swapped model compiles with ``torch.compile(fullgraph=True)`` like the dense model."""

import copy

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse import backends
from knsparse.backends.reference import ReferenceBackend
from knsparse.models import resnet_tiny_digits, vit_tiny_digits


def sparse_pair(seed: int) -> tuple[ks.SparseLinear, ks.SparseLinear]:
    """Two sparse layers of the same shape holding different weights."""
    layers = []
    for s in (seed, seed + 1):
        torch.manual_seed(s)
        lin = nn.Linear(16, 8)
        layers.append(ks.SparseLinear.from_dense(lin, ks.nm_mask(lin.weight.abs(), "2:4")))
    return layers[0], layers[1]


def sparse_conv_pair() -> tuple[ks.SparseConv2d, ks.SparseConv2d]:
    layers = []
    for s in (0, 1):
        torch.manual_seed(s)
        conv = nn.Conv2d(8, 4, 3, padding=1)
        layers.append(ks.SparseConv2d.from_dense(conv, ks.nm_mask(conv.weight.abs(), "2:4")))
    return layers[0], layers[1]


def reference_out(layer: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return layer.to_dense()(x)


def replace_to_empty(layer, donor):
    layer.to_empty(device="cpu")
    layer.load_state_dict(donor.state_dict())


def replace_assign(layer, donor):
    layer.load_state_dict(copy.deepcopy(donor.state_dict()), assign=True)


def replace_data(layer, donor):
    layer.values.data = donor.values.detach().clone()
    layer.slots.data = donor.slots.detach().clone()
    layer.bias.data = donor.bias.detach().clone()


def replace_in_place(layer, donor):
    with torch.no_grad():
        layer.values.copy_(donor.values)
        layer.slots.copy_(donor.slots)
        layer.bias.copy_(donor.bias)


REPLACEMENTS = [replace_to_empty, replace_assign, replace_data, replace_in_place]


@pytest.fixture(params=[True, False], ids=["reference", "cached-operand"])
def backend_kind(request, monkeypatch):
    """The reference backend (operand derived in forward) and a reference twin that caches its
    operand as the CUDA backends do, so the cache logic runs on CPU too."""
    if request.param:
        yield
        return

    class Caching(ReferenceBackend):
        prepares_in_forward = False

    monkeypatch.setattr(backends, "REFERENCE", Caching())
    yield


@pytest.mark.parametrize("replace", REPLACEMENTS)
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_layer_follows_its_stored_tensors(replace, kind, backend_kind):
    layer, donor = sparse_pair(0) if kind == "linear" else sparse_conv_pair()
    x = torch.randn(3, 16) if kind == "linear" else torch.randn(2, 8, 5, 5)
    before = layer(x)
    replace(layer, donor)
    torch.testing.assert_close(layer(x), donor(x))
    torch.testing.assert_close(layer(x), reference_out(donor, x))
    assert not torch.allclose(before, layer(x))


def test_moves_follow_dtype(backend_kind):
    layer, _ = sparse_pair(0)
    x = torch.randn(3, 16, dtype=torch.float64)
    layer(x.float())
    layer.to(torch.float64)
    assert layer(x).dtype == torch.float64
    torch.testing.assert_close(layer(x), reference_out(layer, x))


def test_swap_move_and_run_inside_inference_mode(backend_kind):
    model = vit_tiny_digits()
    x = torch.randn(2, 1, 8, 8)
    linears = {n: m for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    masks = {n: ks.nm_mask(m.weight.abs(), "2:4") for n, m in linears.items()}
    dense = copy.deepcopy(model)
    with torch.no_grad():
        for n, mask in masks.items():
            dense.get_submodule(n).weight.mul_(mask)
    with torch.inference_mode():
        ks.swap_modules(model, masks)
        model.to(torch.float64)
        out = model(x.double())
        layer = model.get_submodule("blocks.0.mlp.fc1")
        layer.values.mul_(2)  # an in-place write to an inference tensor is followed too
        doubled = layer(torch.ones(1, layer.in_features, dtype=torch.float64))
    torch.testing.assert_close(out, dense.double()(x.double()))
    torch.testing.assert_close(doubled, reference_out(layer, torch.ones(1, layer.in_features).double()))


@pytest.mark.parametrize("build", [vit_tiny_digits, resnet_tiny_digits], ids=["vit", "resnet"])
def test_swapped_model_compiles_fullgraph(build):
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = build().eval()
    masks = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)) and ks.layers.ineligibility(m) is None:
            try:
                masks[name] = ks.nm_mask(m.weight.detach().abs(), "2:4")
            except ValueError:
                continue
    report = ks.swap_modules(model, masks)
    assert report.swapped
    x = torch.randn(4, 1, 8, 8)
    compiled = torch.compile(model, fullgraph=True)
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)
        # new weights arriving through a state-dict load are seen by the compiled model
        donor = copy.deepcopy(model)
        for layer in ks.modules.sparse_layers(donor).values():
            layer.values.mul_(-1.5)
        model.load_state_dict(donor.state_dict())
        torch.testing.assert_close(compiled(x), donor(x), rtol=1e-4, atol=1e-4)
