"""permute() on real timm, torchvision and Hugging Face architectures (random init, reduced
depth): which layers it reaches, with the model's output unchanged. Skipped where the package
does not import (torchvision needs torch 2.14.1 here; see the ``models`` marker)."""

import pytest
import torch
from torch import nn

from knsparse.core.layers import pattern_layers
from knsparse.core.pattern import Pattern
from knsparse.pruning.permutation import permute

pytestmark = pytest.mark.models


def _reached(model: nn.Module, x: torch.Tensor) -> tuple[float, object]:
    """Permute in place (output checked by permute's calib); the fraction of 2:4 layers reached."""
    layers, _ = pattern_layers(model, Pattern.parse("2:4"))
    report = permute(model.eval(), "2:4", calib=[x], inplace=True, max_iters=0, time_budget_s=0.0)
    reached = {c for g in report.permuted for c in g.consumers} & set(layers)
    return len(reached) / len(layers), report


def test_torchvision_resnet_reuses_its_relu_modules() -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    fraction, report = _reached(torchvision.models.resnet18(num_classes=10), torch.randn(2, 3, 32, 32))
    assert report.trace_error is None
    assert fraction == 1.0  # every conv but the stem (3 input channels) and fc


def test_timm_resnet_head_through_its_flatten_module() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(1)
    fraction, report = _reached(timm.create_model("resnet18", num_classes=10), torch.randn(2, 3, 32, 32))
    assert fraction == 1.0
    assert any("fc" in g.consumers for g in report.permuted)


def test_timm_vit_residual_stream_is_one_group() -> None:
    timm = pytest.importorskip("timm")
    torch.manual_seed(2)
    model = timm.create_model("vit_tiny_patch16_224", depth=2, img_size=32, num_classes=8)
    fraction, report = _reached(model, torch.randn(2, 3, 32, 32))
    stream = next(g for g in report.groups if "blocks.0.attn.qkv" in g.consumers)
    assert set(stream.consumers) == {f"blocks.{i}.{m}" for i in range(2) for m in ("attn.qkv", "mlp.fc1")} | {
        "head"
    }
    assert stream.permuted and fraction == 1.0


def test_hf_convnext_falls_back_block_by_block() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(3)
    config = transformers.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[16, 32, 32, 32], num_labels=4)

    model = _hf_logits(transformers.ConvNextForImageClassification(config))
    fraction, report = _reached(model, torch.randn(2, 3, 32, 32))
    assert report.trace_error is not None  # the whole model does not trace
    assert {g.source for g in report.permuted} == {"fx-block"}
    pointwise = {f"m.convnext.encoder.stages.{i}.layers.0.pwconv2" for i in range(4)}
    assert pointwise <= {c for g in report.permuted for c in g.consumers}
    assert 0 < fraction < 1  # the streams between blocks stay (no graph crosses them)


def _hf_logits(model: nn.Module) -> nn.Module:
    """A Hugging Face classifier returning its logits tensor, so permute() can compare outputs."""

    class Logits(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.m = model

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.m(x).logits

    return Logits()


def test_hf_vit_values_follow_the_family_registry() -> None:
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(4)
    config = transformers.ViTConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        image_size=32,
        patch_size=8,
        num_labels=4,
    )
    model = _hf_logits(transformers.ViTForImageClassification(config))
    _, report = _reached(model, torch.randn(2, 3, 32, 32))
    values = {g.name: g for g in report.groups if g.source == "family"}
    assert set(values) == {
        f"m.vit.layers.{i}.attention.v_proj -> m.vit.layers.{i}.attention.o_proj" for i in range(2)
    }
    assert all(g.permuted for g in values.values())


def _randomised_norms(model: nn.Module) -> nn.Module:
    """Random BatchNorm statistics and affine, so a norm that missed the permutation shows."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g))
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.weight.copy_(torch.randn(m.num_features, generator=g))
                m.bias.copy_(torch.randn(m.num_features, generator=g))
    return model.eval()


@pytest.mark.parametrize(
    "name",
    [
        # inverted residuals coupled through depthwise convs, timm's BatchNormAct2d and the
        # TensorFlow-"same" Conv2dSame
        "tf_efficientnet_lite0",
        # + squeeze-excite: its reduce conv reads the expanded space, its gate multiplies it
        "efficientnet_b0",
    ],
)
def test_timm_efficientnet_couples_through_depthwise_convs(name: str) -> None:
    """Every 2:4 layer (the stem's 3 input channels make it none) sits in a group the search may
    permute (a zero-budget search may still find no gain for one), and the output is unchanged."""
    timm = pytest.importorskip("timm")
    torch.manual_seed(3)
    model = _randomised_norms(timm.create_model(name, num_classes=10))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        want = model(x)
    layers, _ = pattern_layers(model, Pattern.parse("2:4"))
    fraction, report = _reached(model, x)
    assert report.trace_error is None
    searched = {
        c
        for g in report.groups
        if g.skip_reason is None or g.skip_reason.startswith("no permutation found")
        for c in g.consumers
    }
    assert "conv_stem" not in layers
    assert set(layers) <= searched
    assert fraction > 0.95
    # a projection conv reads the expanded channels through the depthwise conv and its norms
    assert any(c.endswith("conv_pwl") for g in report.permuted for c in g.consumers)
    with torch.no_grad():
        torch.testing.assert_close(model(x), want, rtol=1e-4, atol=1e-4)
