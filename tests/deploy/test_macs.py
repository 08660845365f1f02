"""MAC accounting: published dense figures, hand counts, masks, token merging."""

from __future__ import annotations

import itertools

import pytest
import torch
from torch import nn

from knsparse.core.masks import nm_mask
from knsparse.deploy import tome
from knsparse.deploy.macs import macs
from knsparse.models import resnet50, resnet_tiny_digits, vit_base_patch16_224, vit_tiny_digits


def _vit_tiny_hand_count(tokens: list[int], batch: int = 1) -> int:
    """vit_tiny_digits: 2x2 patches of 1 channel, width 64, MLP 128, 10 classes, 16 patches.

    ``tokens[i]`` enter block i; attention runs on them, the MLP on ``tokens[i + 1]`` (ToMe
    merges between the two branches).
    """
    d, hidden = 64, 128
    total = 16 * (1 * 2 * 2) * d + d * 10
    for n_in, n_out in itertools.pairwise(tokens):
        total += n_in * (d * 3 * d + d * d) + 2 * n_in * n_in * d + n_out * 2 * d * hidden
    return batch * total


@pytest.mark.parametrize(("build", "published_gmacs"), [(vit_base_patch16_224, 17.56), (resnet50, 4.09)])
def test_reproduces_published_dense_figures(build, published_gmacs):
    with torch.device("meta"):
        model = build()
    report = macs(model, (1, 3, 224, 224))
    assert abs(report.dense_total / 1e9 - published_gmacs) / published_gmacs < 0.02
    assert report.sparse_total == report.dense_total and report.reduction == 0.0


def test_hand_count_and_batch_scaling():
    model = vit_tiny_digits().eval()
    assert macs(model, (1, 8, 8)).dense_total == _vit_tiny_hand_count([17] * 5)
    assert macs(model, (3, 1, 8, 8)).dense_total == _vit_tiny_hand_count([17] * 5, batch=3)


def test_only_eligible_masked_layers_count_as_reduced():
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    masks = {
        n: nm_mask(torch.rand(m.weight.shape), "2:4") for n, m in layers.items() if n.startswith("blocks")
    }
    masks["head"] = torch.rand(layers["head"].weight.shape) > 0.5  # unstructured: runs dense
    report = macs(model, (1, 8, 8), plan=masks)
    rows = {r.name: r for r in report.layers}
    assert rows["blocks.0.mlp.fc1"].sparse * 2 == rows["blocks.0.mlp.fc1"].dense
    assert rows["head"].sparse == rows["head"].dense and "2:4" in rows["head"].note
    assert rows["patch_embed.proj"].executor == "dense"
    assert rows["blocks.2.attn.matmul"].sparse == rows["blocks.2.attn.matmul"].dense
    halved = sum(r.dense for n, r in rows.items() if n in masks and n != "head")
    assert report.sparse_total == report.dense_total - halved // 2
    assert report.theoretical_speedup == pytest.approx(1 / (1 - report.reduction))


def test_zeros_in_a_dense_layer_are_not_a_reduction():
    model = vit_tiny_digits().eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear):
                m.weight.mul_(nm_mask(m.weight.abs(), "2:4"))
    assert macs(model, (1, 8, 8)).reduction == 0.0


def test_token_merging_counts_merged_shapes_and_leaves_the_model_unpatched():
    model = vit_tiny_digits().eval()
    r = [4, 3, 2, 1]
    report = macs(model, (2, 1, 8, 8), tome_r=r)
    assert not tome.is_applied(model)
    assert report.merges_per_block == tuple(r)
    assert report.dense_total == _vit_tiny_hand_count(tome.token_counts(17, r), batch=2)
    assert report.unmerged_dense_total == _vit_tiny_hand_count([17] * 5, batch=2)
    assert 0 < report.merge_reduction == report.reduction
    tome.apply(model, r)
    assert macs(model, (2, 1, 8, 8)).to_dict() == report.to_dict()
    assert tome.is_applied(model)
    with pytest.raises(ValueError, match="already has token merging"):
        macs(model, (1, 8, 8), tome_r=2)


def test_model_state_is_left_alone():
    model = resnet_tiny_digits().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    macs(model, (4, 1, 8, 8))
    assert model.training and model.layer1[0].bn1.training
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_bad_arguments():
    model = vit_tiny_digits()
    with pytest.raises(ValueError, match="does not have"):
        macs(model, (1, 8, 8), plan={"blocks.9.mlp.fc1": torch.ones(1, dtype=torch.bool)})
    with pytest.raises(ValueError, match="input_shape"):
        macs(model, (8, 8))
    with pytest.raises(ValueError, match="k:n"):
        macs(model, (1, 8, 8), pattern="unstructured")


@pytest.mark.parametrize("build", [vit_tiny_digits, resnet_tiny_digits])
def test_swapped_sparse_modules_count_as_reduced(build):
    from knsparse import swap_modules

    torch.manual_seed(0)
    model = build().eval()
    masks = {
        n: nm_mask(m.weight.abs(), "2:4")
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n.startswith(("blocks", "layer"))
    }
    from_masks = macs(model, (1, 8, 8), plan=masks)
    swap_modules(model, masks)
    swapped = macs(model, (1, 8, 8))
    assert swapped.dense_total == from_masks.dense_total
    assert swapped.sparse_total == from_masks.sparse_total < swapped.dense_total
    rows = {r.name: r for r in swapped.layers}
    assert all(rows[n].executor == "sparse 2:4 (reference)" for n in masks)
    assert rows["head" if "head" in rows else "fc"].executor == "dense"
