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
        if isinstance(m, (nn.Linear, nn.Conv2d)) and ks.core.layers.ineligibility(m) is None:
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
        for layer in ks.sparse.modules.sparse_layers(donor).values():
            layer.values.mul_(-1.5)
        model.load_state_dict(donor.state_dict())
        torch.testing.assert_close(compiled(x), donor(x), rtol=1e-4, atol=1e-4)


def replace_data_twice(layer, donor):
    """``.data =`` twice with no forward between: the first replacement's memory is freed and the
    allocator may hand it to the second, so an address key alone would match the old operand."""
    for name in ("values", "slots"):
        getattr(layer, name).data = torch.zeros_like(getattr(layer, name))
        getattr(layer, name).data = getattr(donor, name).detach().clone()
    layer.bias.data = donor.bias.detach().clone()


def test_cached_operand_never_matches_reused_memory(backend_kind):
    layer, _ = sparse_pair(0)
    x = torch.randn(3, 16)
    for seed in range(20):
        _, donor = sparse_pair(seed)
        layer(x)
        replace_data_twice(layer, donor)
        torch.testing.assert_close(layer(x), reference_out(donor, x))


@pytest.mark.parametrize("replace", [*REPLACEMENTS, replace_data_twice])
@pytest.mark.parametrize("kind", ["linear", "conv"])
def test_compiled_layer_follows_its_stored_tensors(replace, kind, backend_kind):
    """A compiled layer traces the preparation of its operand: it holds no operand from trace
    time, and new values, however they arrive, are what it computes with."""
    torch._dynamo.reset()
    layer, donor = sparse_pair(0) if kind == "linear" else sparse_conv_pair()
    x = torch.randn(3, 16) if kind == "linear" else torch.randn(2, 8, 5, 5)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), reference_out(layer, x))
        replace(layer, donor)
        torch.testing.assert_close(compiled(x), reference_out(donor, x))
        with torch.inference_mode():
            layer.values.mul_(-2)
            torch.testing.assert_close(compiled(x), reference_out(layer, x))


def test_compiled_model_survives_many_loads(backend_kind):
    """Loading weights does not reset the layer's backend, so a compiled model does not recompile
    at every load (fullgraph=True would fail at the recompile limit)."""
    torch._dynamo.reset()
    layer, donor = sparse_pair(0)
    x = torch.randn(3, 16)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        for i in range(2 * torch._dynamo.config.recompile_limit):
            donor.values.mul_(-1.1)
            layer.load_state_dict(donor.state_dict())
            torch.testing.assert_close(compiled(x), reference_out(donor, x), msg=f"load {i}")


def test_knsparse_cuda_preparation_traces_fullgraph():
    """knsparse-cuda's operand (2:4 pack + metadata) is plain tensor ops that torch.compile traces
    whole, so a compiled model packs the stored weight inside its graph (checked here on CPU)."""
    from knsparse.backends.knsparse_cuda import KNSPARSE_CUDA

    torch._dynamo.reset()
    torch.manual_seed(0)
    dense = torch.randn(48, 80)
    weight = (dense * ks.nm_mask(dense.abs(), "2:4")).half()
    eager = KNSPARSE_CUDA.prepare_linear(weight)
    traced = torch.compile(KNSPARSE_CUDA.prepare_linear, fullgraph=True, backend="aot_eager")(weight)
    assert traced.rows == eager.rows and traced.depth == eager.depth
    assert torch.equal(traced.values, eager.values) and torch.equal(traced.meta, eager.meta)
