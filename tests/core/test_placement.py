"""Issue 13 class 3: layers whose parent reads their weight directly (MultiheadAttention's
out_proj), layers registered under two names, and tied weights are skipped with a reason by
pruning, swapping, loading, MAC counting and permutation; the model's function never changes."""

import copy

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse.core.layers import pattern_layers, placement_reasons, prunable_layers


def tokens(images: torch.Tensor) -> torch.Tensor:
    """``[B, 1, T, 16]`` images (what ``macs`` feeds) as ``[B, T, 16]`` tokens."""
    return images.reshape(images.shape[0], -1, 16)


class WithMHA(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(16, 2, batch_first=True)
        self.fc = nn.Linear(16, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens(x)
        return self.fc(self.attn(x, x, x, need_weights=False)[0])


class Aliased(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = self.a  # one Linear, two names
        self.out = nn.Linear(32, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens(x)
        return self.out(torch.relu(self.a(x)) + torch.relu(self.b(-x)))


class Tied(nn.Module):
    """fc3 shares fc1's weight; fc1 -> fc2 and fc3 -> fc4 are separate channel spaces."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.fc3, self.fc4 = nn.Linear(16, 32), nn.Linear(32, 16)
        self.fc3.weight = self.fc1.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = tokens(x)
        return self.fc2(torch.relu(self.fc1(x))) + self.fc4(torch.relu(self.fc3(x)))


CASES = {
    "mha": (WithMHA, {"attn.out_proj": "reads this layer's weight directly"}, ["fc"]),
    "aliased": (Aliased, {"a": "several names", "b": "several names"}, ["out"]),
    "tied": (Tied, {"fc1": "tied to fc3.weight", "fc3": "tied to fc1.weight"}, ["fc2", "fc4"]),
}


def all_masks(model: nn.Module) -> dict[str, torch.Tensor]:
    named = dict(model.named_modules(remove_duplicate=False))
    return {
        n: ks.nm_mask(m.weight.detach().abs(), "2:4") for n, m in named.items() if isinstance(m, nn.Linear)
    }


@pytest.mark.parametrize("case", list(CASES))
def test_prune_swap_macs_skip_with_reason(case, tmp_path):
    build, skipped, eligible = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(2, 1, 5, 16)
    reasons = placement_reasons(model)
    for name, why in skipped.items():
        assert why in reasons[name]
    assert sorted(prunable_layers(model)) == eligible
    layers, why_not = pattern_layers(model, ks.Pattern(2, 4))
    assert sorted(layers) == eligible
    assert all(skipped[n] in why_not[n] for n in skipped if n in why_not)

    masks = all_masks(model)
    report = ks.macs(model, (2, 1, 5, 16), plan=masks)
    dense_rows = {r.name for r in report.layers if r.executor == "dense"}
    assert set(skipped) & {r.name for r in report.layers} <= dense_rows

    expected = copy.deepcopy(model)
    with torch.no_grad():
        for name in eligible:
            expected.get_submodule(name).weight.mul_(masks[name])
    swap = ks.swap_modules(model, masks)
    assert sorted(swap.swapped) == eligible
    for name, why in skipped.items():
        assert why in swap.skipped[name]
        assert isinstance(model.get_submodule(name), nn.Linear)
    with torch.no_grad():
        torch.testing.assert_close(model(x), expected(x))

    ks.save_sparse(model, tmp_path / "m.safetensors")  # tied tensors are written too
    loaded = ks.load_sparse(build().eval(), tmp_path / "m.safetensors")
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected(x))


@pytest.mark.parametrize("case", list(CASES))
def test_permute_never_changes_function(case):
    build, skipped, _ = CASES[case]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(4, 1, 5, 16)
    with torch.no_grad():
        before = model(x)
    report = ks.permute(model, "2:4", inplace=True)
    with torch.no_grad():
        torch.testing.assert_close(model(x), before, rtol=1e-5, atol=1e-5)
    for group in report.groups:
        if set(group.consumers) & set(skipped):
            assert not group.permuted and group.skip_reason
    if case == "tied":
        assert model.fc1.weight is model.fc3.weight


def test_load_refuses_sparse_file_for_a_layer_mha_reads_directly(tmp_path):
    torch.manual_seed(0)
    source = nn.Sequential(nn.Linear(16, 16))
    ks.swap_modules(source, {"0": ks.nm_mask(source[0].weight.abs(), "2:4")})
    path = tmp_path / "s.safetensors"
    ks.save_sparse(source, path)
    target = nn.Sequential(nn.MultiheadAttention(16, 2))
    state = copy.deepcopy(target.state_dict())
    # a file claiming MHA's out_proj is sparse: rename the layer in a rewritten file
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    tensors = {k.replace("0.", "0.out_proj.", 1): v for k, v in load_file(str(path)).items()}
    tensors.update({k: v for k, v in state.items() if not k.startswith("0.out_proj.")})
    meta = {k: v.replace('"0"', '"0.out_proj"') for k, v in meta.items()}
    save_file(tensors, str(path), metadata=meta)
    with pytest.raises(ValueError, match="reads this layer's weight directly"):
        ks.load_sparse(target, path)
    assert all(torch.equal(v, state[k]) for k, v in target.state_dict().items())
