"""permute(): coupling groups found by torch.fx (block by block, or from the family registry,
where the whole model does not trace), applied without changing the function, and raising the
fraction of magnitude a k:n mask keeps, averaged over each permuted group's layers."""

import copy

import pytest
import torch
from torch import nn

import knsparse.pruning.permutation.apply as apply_mod
from knsparse.core.masks import nm_mask
from knsparse.models import resnet50, resnet_tiny_digits, vit_base_patch16_224, vit_tiny_digits
from knsparse.models.vit import Attention, Mlp
from knsparse.pruning.permutation import find_groups, permute
from knsparse.pruning.permutation.groups import apply_permutation


def _randomise_norms(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and norm affines, so a missed permutation shows."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, (nn.BatchNorm2d, nn.LayerNorm)):
                m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=g))
                m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=g))
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(0.3 * torch.randn(m.running_mean.shape, generator=g))
                m.running_var.copy_(0.5 + torch.rand(m.running_var.shape, generator=g))
    return model.eval()


def _kept(model: nn.Module, name: str, pattern: str = "2:4") -> float:
    w = model.get_submodule(name).weight.detach().abs()
    return float((w * nm_mask(w, pattern)).double().sum())


def _check_permuted(model: nn.Module, x: torch.Tensor, **kwargs) -> apply_mod.PermutationReport:
    """Permute a copy; outputs agree to 1e-5 and every permuted group keeps a larger fraction
    under 2:4, averaged over its layers; single-layer groups never keep less."""
    before = copy.deepcopy(model)
    with torch.no_grad():
        want = model(x)
    report = permute(model, "2:4", inplace=True, **kwargs)
    with torch.no_grad():
        got = model(x)
    assert (got - want).abs().max().item() <= 1e-5
    assert report.permuted
    for i, group in enumerate(report.permuted):
        ratios = [after / before for before, after in group.layers.values()]
        assert sum(ratios) / len(ratios) > 1
        assert len(ratios) > 1 or ratios[0] > 1
        for name, (kept_before, kept_after) in group.layers.items():
            if i < 6:  # recompute a few independently through knsparse.core.masks
                assert _kept(before, name) == pytest.approx(kept_before, rel=1e-6)
                assert _kept(model, name) == pytest.approx(kept_after, rel=1e-6)
    return report


def test_tiny_vit_groups_and_function() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(vit_tiny_digits())
    report = _check_permuted(model, torch.randn(3, 1, 8, 8), max_iters=0, time_budget_s=0.0)
    names = {g.name for g in report.groups}
    for i in range(4):
        assert f"blocks.{i}.mlp.fc1 -> blocks.{i}.mlp.fc2" in names
        assert f"blocks.{i}.attn.qkv -> blocks.{i}.attn.proj" in names
    stream = next(g for g in report.groups if g.name.startswith("patch_embed.proj ->"))
    assert set(stream.consumers) == {f"blocks.{i}.{m}" for i in range(4) for m in ("attn.qkv", "mlp.fc1")} | {
        "head"
    }
    assert all(g.permuted for g in report.groups if g.consumers != ["patch_embed.proj"])


def test_tiny_resnet_groups_and_function() -> None:
    torch.manual_seed(0)
    model = _randomise_norms(resnet_tiny_digits())
    report = _check_permuted(model, torch.randn(3, 1, 8, 8), max_iters=0, time_budget_s=0.0)
    stem = next(g for g in report.groups if g.consumers == ["conv1"])
    assert not stem.permuted and "model input" in stem.skip_reason  # first layer's inputs stay
    head = next(g for g in report.groups if g.consumers == ["fc"])
    assert all(m.role != "producer" or m.name != "fc" for m in find_groups(model).groups[0].members)
    assert head.permuted  # fc's input columns move with layer4's channels; its outputs never do
    residual = next(g for g in report.groups if g.name.startswith("layer1.0.conv3"))
    assert set(residual.consumers) == {"layer2.0.conv1", "layer2.0.downsample.0"}


def test_attention_permutes_values_within_heads_only() -> None:
    torch.manual_seed(1)
    model = vit_tiny_digits().eval()
    group = next(g for g in find_groups(model).groups if g.block)
    qkv = model.blocks[0].attn.qkv.weight.detach().clone()
    perm = torch.cat([h * 16 + torch.randperm(16) for h in range(4)])
    apply_permutation(model, group, perm)
    after = model.get_submodule(group.consumers[0].replace("proj", "qkv")).weight
    name = group.consumers[0].rsplit(".", 2)[0]
    assert name == "blocks.0"
    assert torch.equal(after[:128], qkv[:128])  # q and k untouched
    assert torch.equal(after[128:], qkv[128:][perm])


class _Untraceable(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace it, the timm fallback must."""

    def __init__(self) -> None:
        super().__init__()
        self.inp = nn.Linear(12, 32)
        self.attn = Attention(32, num_heads=2)
        self.mlp = Mlp(32, 64)
        self.out = nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.inp(x)
        if h.sum() > 0:
            h = h + self.attn(h)
        return self.out(h + self.mlp(h))


def test_untraceable_model_falls_back_to_family_blocks() -> None:
    torch.manual_seed(2)
    model = _Untraceable().eval()
    x = torch.randn(2, 6, 12)
    report = _check_permuted(model, x, max_iters=10)
    assert report.trace_error is not None
    assert {g.name for g in report.permuted} == {"attn.qkv -> attn.proj", "mlp.fc1 -> mlp.fc2"}
    assert all(g.source == "family" for g in report.groups)


class _Awkward(nn.Module):
    """Couplings the analysis must refuse: a channel shuffle, a layer called twice, and a
    width that 2:4 cannot tile; plus an SE-style gate and a depthwise conv it must handle."""

    def __init__(self) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.mix = nn.Conv2d(8, 8, 1)  # its input is channel-shuffled
        self.shared = nn.Conv2d(8, 8, 1)  # called twice
        self.pre = nn.Conv2d(8, 8, 1)
        self.dw = nn.Conv2d(8, 8, 3, padding=1, groups=8)
        self.bn = nn.BatchNorm2d(8)
        self.gate_down = nn.Conv2d(8, 4, 1)
        self.gate_up = nn.Conv2d(4, 8, 1)
        self.odd = nn.Conv2d(8, 6, 1)
        self.tail = nn.Conv2d(6, 8, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.stem(x)
        b, c, h, w = x.shape
        x = self.mix(x.reshape(b, 2, c // 2, h, w).transpose(1, 2).reshape(b, c, h, w))
        x = self.pre(self.shared(self.shared(x)))
        x = torch.relu(self.bn(self.dw(x)))
        x = x * torch.sigmoid(self.gate_up(torch.relu(self.gate_down(x.mean((2, 3), keepdim=True)))))
        x = self.tail(torch.relu(self.odd(x)))
        return self.fc(torch.flatten(self.pool(x), 1))


def test_unprovable_couplings_are_skipped_with_reasons() -> None:
    torch.manual_seed(3)
    model = _randomise_norms(_Awkward())
    report = _check_permuted(model, torch.randn(2, 3, 6, 6), max_iters=10)
    by_consumer = {c: g for g in report.groups for c in g.consumers}
    assert "reshape" in by_consumer["mix"].skip_reason
    assert "more than once" in by_consumer["shared"].skip_reason
    assert "not a multiple of n=4" in by_consumer["tail"].skip_reason
    gated = by_consumer["gate_down"]  # dw + bn + gate: one space, consumers gate_down and odd
    assert set(gated.consumers) == {"gate_down", "odd"} and gated.skip_reason is None
    gated_members = next(g.members for g in find_groups(model).groups if "gate_down" in g.consumers)
    assert {"pre", "dw", "bn", "gate_up"} <= {m.name for m in gated_members}
    assert "fc" in by_consumer and by_consumer["fc"].skip_reason is None


def test_not_inplace_leaves_the_model_alone() -> None:
    torch.manual_seed(4)
    model = vit_tiny_digits().eval()
    state = copy.deepcopy(model.state_dict())
    report = permute(model, "2:4", inplace=False, max_iters=0, time_budget_s=0.0)
    assert report.model is not model and report.permuted
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_a_misjudged_coupling_is_caught_and_undone(monkeypatch: pytest.MonkeyPatch) -> None:
    torch.manual_seed(5)
    model = _randomise_norms(resnet_tiny_digits())
    state = copy.deepcopy(model.state_dict())

    def consumers_only(model, group, perm):
        group.members = [m for m in group.members if m.role == "consumer"]
        apply_permutation(model, group, perm)

    monkeypatch.setattr(apply_mod, "apply_permutation", consumers_only)
    with pytest.raises(RuntimeError, match="restored"):
        permute(model, "2:4", calib=[torch.randn(2, 1, 8, 8)], inplace=True, max_iters=0, time_budget_s=0.0)
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_bad_arguments() -> None:
    model = vit_tiny_digits()
    with pytest.raises(ValueError, match="k:n pattern"):
        permute(model, "unstructured")
    with pytest.raises(ValueError, match="no batches"):
        permute(model, "2:4", calib=[])


@pytest.fixture(scope="module")
def vit_b16() -> nn.Module:
    torch.manual_seed(6)
    return _randomise_norms(vit_base_patch16_224())


@pytest.fixture(scope="module")
def resnet_50() -> nn.Module:
    torch.manual_seed(7)
    model = resnet50()
    # BatchNorm statistics from a few batches keep the random network's activations O(1).
    model.train()
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 64, 64))
    return model.eval()


@pytest.mark.slow
def test_vit_b16_shapes(vit_b16: nn.Module) -> None:
    report = _check_permuted(vit_b16, torch.randn(1, 3, 224, 224), max_iters=0, time_budget_s=0.0)
    assert len(report.groups) == 26  # input, residual stream, 12 MLPs, 12 attention blocks
    assert any(g.name.startswith("blocks.11.mlp") for g in report.permuted)


@pytest.mark.slow
def test_resnet50_shapes(resnet_50: nn.Module) -> None:
    report = _check_permuted(resnet_50, torch.randn(2, 3, 64, 64), max_iters=0, time_budget_s=0.0)
    assert len(report.groups) == 2 * 16 + 6  # input, two per bottleneck, stem output, four stage streams
    assert any(g.name.startswith("layer4.2.conv2") for g in report.permuted)


class _SharedRelu(nn.Module):
    """torchvision's BasicBlock calls one ``relu`` module twice; ``nn.Flatten`` feeds the head;
    a LayerNorm subclass (like timm's) traces to ``F.layer_norm``."""

    class _Norm(nn.LayerNorm):
        pass

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.bn1 = nn.BatchNorm2d(8)
        self.conv2 = nn.Conv2d(8, 8, 3, padding=1)
        self.bn2 = nn.BatchNorm2d(8)
        self.relu = nn.ReLU()
        self.conv3 = nn.Conv2d(8, 16, 1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flatten = nn.Flatten(1)
        self.norm = self._Norm(16)
        self.fc = nn.Linear(16, 4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.relu(self.bn1(self.conv1(x)))
        x = self.relu(x + self.bn2(self.conv2(x)))
        x = self.relu(self.conv3(x))
        return self.fc(self.norm(self.flatten(self.pool(x))))


def test_a_reused_elementwise_module_is_judged_at_each_call() -> None:
    torch.manual_seed(8)
    model = _randomise_norms(_SharedRelu())
    report = _check_permuted(model, torch.randn(2, 3, 6, 6), max_iters=10)
    by_consumer = {c: g for g in report.groups for c in g.consumers}
    assert set(by_consumer["conv2"].consumers) == {"conv2", "conv3"}  # the residual joins them
    assert by_consumer["conv2"].permuted and by_consumer["fc"].permuted
    head = next(g for g in find_groups(model).groups if "fc" in g.consumers)
    assert {"norm.weight", "norm.bias", "conv3"} <= {m.name for m in head.members}


class _UntraceableTop(nn.Module):
    """The top level does not trace (data-dependent branch); its body, a plain Sequential, does."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.GELU(), nn.LayerNorm(16), nn.Linear(16, 8))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) if x.sum() > -1e9 else x


def test_an_untraceable_model_is_traced_block_by_block() -> None:
    torch.manual_seed(9)
    model = _randomise_norms(_UntraceableTop())
    report = _check_permuted(model, torch.randn(2, 5, 8), max_iters=10)
    assert report.trace_error is not None
    inner = next(g for g in report.groups if g.consumers == ["body.3"])
    assert inner.permuted and inner.source == "fx-block"
    assert "model input" in next(g for g in report.groups if g.consumers == ["body.0"]).skip_reason
