import contextlib
import copy

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse import backends
from knsparse.backends import BackendUnavailableError
from knsparse.models import VisionTransformer, resnet_tiny_digits, vit_tiny_digits
from knsparse.sparse.modules import sparse_layers


def magnitude_masks(model: nn.Module, pattern: str = "2:4") -> dict[str, torch.Tensor]:
    out = {}
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.Conv2d)):
            with contextlib.suppress(ValueError):  # shapes the pattern cannot tile stay dense
                out[name] = ks.nm_mask(m.weight.detach().abs(), pattern)
    return out


def masked_copy(model: nn.Module, masks: dict[str, torch.Tensor]) -> nn.Module:
    ref = copy.deepcopy(model)
    with torch.no_grad():
        for name, mask in masks.items():
            ref.get_submodule(name).weight.mul_(mask)
    return ref


@pytest.mark.parametrize("pattern", ["2:4", "6:12", "8:16", "12:16"])
def test_sparse_linear_equals_masked_dense(pattern):
    torch.manual_seed(0)
    lin = nn.Linear(48, 20)
    mask = ks.nm_mask(lin.weight.detach().abs(), pattern)
    sl = ks.SparseLinear.from_dense(lin, mask, pattern=pattern)
    x = torch.randn(3, 5, 48)  # any leading dims
    ref = nn.functional.linear(x, lin.weight * mask, lin.bias)
    assert (sl(x) - ref).abs().max() <= 1e-5
    assert sl.active_backend == "reference"
    dense = sl.to_dense()
    assert torch.equal(dense.weight, lin.weight * mask)
    assert torch.equal(sl.mask(), mask)


def test_sparse_conv_equals_masked_dense():
    torch.manual_seed(0)
    conv = nn.Conv2d(8, 6, 3, stride=2, padding=1, dilation=1)
    mask = ks.nm_mask(conv.weight.detach().abs(), "2:4")
    sc = ks.SparseConv2d.from_dense(conv, mask)
    x = torch.randn(2, 8, 9, 9)
    ref = nn.functional.conv2d(x, conv.weight * mask, conv.bias, 2, 1)
    assert (sc(x) - ref).abs().max() <= 1e-5
    assert torch.equal(sc.to_dense().weight, conv.weight * mask)


def test_from_dense_rejects_bad_masks_naming_layer():
    lin = nn.Linear(8, 4)
    with pytest.raises(ValueError, match="'blocks.0.fc1'.*shape"):
        ks.SparseLinear.from_dense(lin, torch.ones(4, 4, dtype=torch.bool), name="blocks.0.fc1")
    with pytest.raises(ValueError, match="not 2:4"):
        ks.SparseLinear.from_dense(lin, torch.ones(4, 8, dtype=torch.bool), name="fc")
    with pytest.raises(TypeError, match="nn.Linear"):
        ks.SparseLinear.from_dense(nn.Conv2d(4, 4, 1), torch.ones(4, 4, 1, 1, dtype=torch.bool))
    with torch.no_grad():
        lin.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match="NaN"):
        ks.SparseLinear.from_dense(lin, ks.nm_mask(torch.rand(4, 8), "2:4"))


def test_grouped_conv_not_eligible():
    conv = nn.Conv2d(8, 8, 3, groups=8)
    with pytest.raises(ValueError, match="depthwise"):
        ks.SparseConv2d.from_dense(conv, torch.ones(8, 1, 3, 3, dtype=torch.bool))


@pytest.mark.parametrize("build", [vit_tiny_digits, resnet_tiny_digits])
def test_swap_whole_model_matches_masked_dense(build):
    torch.manual_seed(0)
    model = build().eval()
    masks = magnitude_masks(model)
    ref = masked_copy(model, masks)
    report = ks.swap_modules(model, masks)
    assert set(report.swapped) == set(masks) and not report.skipped
    assert set(sparse_layers(model)) == set(masks)
    x = torch.randn(4, 1, 8, 8)
    with torch.no_grad():
        assert (model(x) - ref(x)).abs().max() <= 1e-5


def test_swap_reports_skips_and_filters():
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    masks = magnitude_masks(model)
    masks["blocks.0.mlp.fc2"] = torch.ones_like(model.blocks[0].mlp.fc2.weight, dtype=torch.bool)
    report = ks.swap_modules(model, masks, include=["blocks.*"], exclude=["*.attn.qkv"])
    assert "not 2:4" in report.skipped["blocks.0.mlp.fc2"]
    assert report.skipped["head"] == "not matched by include"
    assert report.skipped["blocks.1.attn.qkv"] == "matched by exclude"
    assert isinstance(model.blocks[0].mlp.fc2, nn.Linear)  # skipped layers stay as they were
    assert isinstance(model.blocks[0].mlp.fc1, ks.SparseLinear)
    assert "skipped" in str(report)


def test_swap_is_all_or_nothing():
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    masks = magnitude_masks(model)
    masks["blocks.3.mlp.fc2"] = torch.ones(3, 3, dtype=torch.bool)  # wrong shape, processed last
    with pytest.raises(ValueError, match="blocks.3.mlp.fc2"):
        ks.swap_modules(model, masks)
    assert not sparse_layers(model)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    with pytest.raises(ValueError, match="does not have"):
        ks.swap_modules(model, {"blocks.9.nothing": torch.ones(1)})
    with pytest.raises(TypeError, match="LayerNorm"):
        ks.swap_modules(model, {"norm": torch.ones(64, dtype=torch.bool)})
    with pytest.raises(ValueError, match="unstructured"):
        ks.swap_modules(model, {}, pattern="unstructured")


def test_unavailable_backend_says_why():
    lin = nn.Linear(64, 32)
    mask = ks.nm_mask(lin.weight.detach().abs(), "2:4")
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(BackendUnavailableError, match="CUDA"):
        ks.SparseLinear.from_dense(lin, mask, backend="torch-cusparselt")
    with pytest.raises(ValueError, match="unknown backend"):
        ks.SparseLinear.from_dense(lin, mask, backend="magic")


def test_available_lists_every_backend_with_reason():
    statuses = {s.name: s for s in backends.available()}
    assert {"reference", "torch-cusparselt", "torch-cutlass"} <= set(statuses)
    assert statuses["reference"].available
    for s in statuses.values():
        assert s.reason


def swapped_and_saved(model: nn.Module, path) -> nn.Module:
    """``model`` (seeded init) swapped with 2:4 magnitude masks and saved to ``path``."""
    ks.swap_modules(model, magnitude_masks(model))
    ks.save_sparse(model, path)
    return model


def test_safetensors_round_trip_is_exact(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "sparse.safetensors"
    model = swapped_and_saved(resnet_tiny_digits().eval(), path)
    loaded = ks.load_sparse(resnet_tiny_digits().eval(), path)
    assert set(sparse_layers(loaded)) == set(sparse_layers(model))
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))


def test_load_refuses_a_file_of_another_model_and_changes_nothing(tmp_path):
    torch.manual_seed(0)
    path = tmp_path / "vit.safetensors"
    swapped_and_saved(vit_tiny_digits().eval(), path)
    other = VisionTransformer(8, 2, 1, 10, 96, 4, 4, 2.0).eval()  # same layer names, width 96
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(ValueError, match="does not fit this model.*shape/dtype mismatches"):
        ks.load_sparse(other, path)
    assert not sparse_layers(other)
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_load_refuses_foreign_file(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "plain.safetensors"
    save_file({"w": torch.zeros(2)}, str(path))
    with pytest.raises(ValueError, match="not written by knsparse"):
        ks.load_sparse(vit_tiny_digits(), path)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_semi_structured_linear_on_gpu(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(256, 128).cuda().to(dtype)
    mask = ks.nm_mask(lin.weight.detach().abs(), "2:4")
    sl = ks.SparseLinear.from_dense(lin, mask)
    assert sl.active_backend in ("torch-cusparselt", "torch-cutlass")
    x = torch.randn(64, 256, device="cuda", dtype=dtype)
    w = (lin.weight * mask).float()
    ref = x.float() @ w.t() + lin.bias.float()
    torch_err = ((x @ (lin.weight * mask).t() + lin.bias).float() - ref).abs().max()
    assert (sl(x).float() - ref).abs().max() <= 2 * torch_err + 1e-6
