"""Production architectures end to end: prune -> swap -> ONNX export -> TensorRT 2:4 check.

timm, torchvision and Hugging Face models, random init and reduced depth so they run on CPU.
Every exported file is cross-checked against NVIDIA Polygraphy's own sparsity inspection (the
rule TensorRT applies). Marked ``models``: ``make test-models`` runs them in ``.venv-models``
(torch 2.14.1 + torchvision 0.29.1); without those packages they skip.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import knsparse as ks
from knsparse.deploy.export import check, export_onnx
from knsparse.integrations import mha

pytestmark = pytest.mark.models


def _timm(name: str, size: int, **kw) -> Callable[[], tuple[nn.Module, torch.Tensor]]:
    def build():
        timm = pytest.importorskip("timm")
        return timm.create_model(name, pretrained=False, num_classes=10, **kw), torch.randn(2, 3, size, size)

    return build


def _torchvision_resnet50():
    tv = pytest.importorskip("torchvision")
    model = tv.models.resnet50(num_classes=10)
    for stage in ("layer1", "layer2", "layer3", "layer4"):
        setattr(model, stage, getattr(model, stage)[:1])  # reduced depth: one bottleneck per stage
    return model, torch.randn(2, 3, 64, 64)


def _torchvision_vit_b_16():
    tv = pytest.importorskip("torchvision")
    model = tv.models.vit_b_16(image_size=32, num_classes=10)
    model.encoder.layers = model.encoder.layers[:1]  # reduced depth
    return model, torch.randn(2, 3, 32, 32)


def _hf(kind: str):
    def build():
        tf = pytest.importorskip("transformers")
        if kind == "vit":
            config = tf.ViTConfig(
                image_size=32,
                patch_size=8,
                hidden_size=64,
                num_hidden_layers=2,
                num_attention_heads=4,
                intermediate_size=128,
                num_labels=10,
            )
            model = tf.ViTForImageClassification(config)
        elif kind == "convnext":
            config = tf.ConvNextConfig(depths=[1, 1, 1, 1], hidden_sizes=[32, 64, 128, 256], num_labels=10)
            model = tf.ConvNextForImageClassification(config)
        else:
            config = tf.SwinConfig(
                image_size=32,
                patch_size=4,
                embed_dim=32,
                depths=[1, 1],
                num_heads=[2, 4],
                window_size=4,
                num_labels=10,
            )
            model = tf.SwinForImageClassification(config)
        return model, {"pixel_values": torch.randn(2, 3, 32, 32)}

    return build


MODELS = {
    "timm:vit_tiny_patch16_224": _timm("vit_tiny_patch16_224", 32, img_size=32, depth=2),
    "timm:deit_tiny_patch16_224": _timm("deit_tiny_patch16_224", 32, img_size=32, depth=2),
    "timm:swin_tiny_patch4_window7_224": _timm(
        "swin_tiny_patch4_window7_224", 64, img_size=64, window_size=4, depths=(1, 1, 1, 1), embed_dim=48
    ),
    "timm:convnext_tiny": _timm("convnext_tiny", 64, depths=(1, 1, 1, 1), dims=(48, 96, 192, 384)),
    "timm:resnet50": _timm("resnet50", 64, layers=(1, 1, 1, 1)),
    "torchvision:resnet50": _torchvision_resnet50,
    "torchvision:vit_b_16": _torchvision_vit_b_16,
    "hf:vit": _hf("vit"),
    "hf:convnext": _hf("convnext"),
    "hf:swin": _hf("swin"),
}


def _polygraphy_sparse(path: str) -> set[str]:
    """The initializers Polygraphy's ``inspect sparsity`` reports as 2:4."""
    pytest.importorskip("polygraphy")
    import onnx
    from polygraphy.logger import G_LOGGER
    from polygraphy.tools.sparse import SparsityPruner

    G_LOGGER.severity = G_LOGGER.ERROR
    logging.getLogger("polygraphy").setLevel(logging.ERROR)
    pruner = SparsityPruner(onnx.load(path))
    pruner.check()
    return set(pruner.sparse_tensors)


def _calib(source: str, example: object) -> object:
    """Calibration data in the form a user of that library has: HF dict batches, a labelled
    DataLoader of ``(x, y)`` for timm's ViTs; none for the rest (magnitude masks need none, and
    the certificate it buys costs minutes on the wide models)."""
    if isinstance(example, dict):
        return [example]
    if source.startswith("timm:vit"):
        return DataLoader(TensorDataset(example, torch.zeros(len(example))), batch_size=len(example))
    return None


@pytest.mark.parametrize("source", sorted(MODELS))
def test_prune_swap_export_check(tmp_path, source):
    torch.manual_seed(0)
    model, example = MODELS[source]()
    model.eval()
    converted = mha.convert(model)  # torchvision's ViT: q/k/v and out projections become Linear
    assert bool(converted) == (source == "torchvision:vit_b_16")
    plan = ks.prune(model, method="magnitude", pattern="2:4", calib=_calib(source, example), progress=False)
    pruned = plan.model
    swap = ks.swap_modules(pruned, plan.masks, pattern="2:4", backend="reference")
    swapped = set(plan.masks)
    assert swapped and len(swap.swapped) == len(swapped)
    if converted:
        assert {f"{converted[0]}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= swapped

    result = export_onnx(pruned, example, tmp_path / "model.onnx")
    assert result.max_abs_diff["CPUExecutionProvider"] <= result.tolerance
    records = {r.layer: r for r in result.layers}
    assert all(records[n].initializer for n in swapped), [n for n in swapped if not records[n].initializer]

    checks = check(result.path)
    ours = {c.name for c in checks if c.is_24}
    assert {c.layer for c in checks if c.is_24} >= swapped  # every swapped layer is 2:4 for TensorRT
    assert ours == _polygraphy_sparse(result.path)  # and NVIDIA's checker agrees, tensor by tensor


@pytest.mark.parametrize("source", ["timm:convnext_tiny", "hf:vit"])
def test_float16_export_of_a_pruned_model(tmp_path, source):
    torch.manual_seed(0)
    model, example = MODELS[source]()
    plan = ks.prune(model.eval(), method="magnitude", pattern="2:4", progress=False)
    result = export_onnx(plan.model, example, tmp_path / "model16.onnx", dtype="float16")
    assert result.max_abs_diff["CPUExecutionProvider"] <= result.tolerance
    assert result.tolerance == max(1e-4, 2 * result.torch_dtype_error)
    checks = check(result.path)
    assert {c.layer for c in checks if c.is_24} >= set(plan.masks)
    assert {c.name for c in checks if c.is_24} == _polygraphy_sparse(result.path)
