import pytest
import torch
from torch import nn

from knsparse.app import (
    calibration_batches,
    evaluate,
    load_digits_split,
    pretrained,
    train,
    trainer,
    validation_split,
)
from knsparse.app.trainer import _checkpoint_path
from knsparse.core.masks import apply_masks
from knsparse.models import resnet50, resnet_tiny_digits, vit_base_patch16_224, vit_tiny_digits


def n_params(m: nn.Module) -> int:
    return sum(p.numel() for p in m.parameters())


def test_real_shapes_match_timm():
    vit = vit_base_patch16_224()
    assert n_params(vit) == 86_567_656  # timm vit_base_patch16_224
    names = dict(vit.named_modules())
    for n in [
        "patch_embed.proj",
        "blocks.11.attn.qkv",
        "blocks.11.attn.proj",
        "blocks.0.mlp.fc1",
        "blocks.0.mlp.fc2",
        "norm",
        "head",
    ]:
        assert n in names
    assert vit.pos_embed.shape == (1, 197, 768) and vit.cls_token.shape == (1, 1, 768)
    rn = resnet50()
    assert n_params(rn) == 25_557_032  # timm / torchvision resnet50
    names = dict(rn.named_modules())
    for n in [
        "conv1",
        "bn1",
        "layer1.0.conv3",
        "layer1.0.downsample.0",
        "layer1.0.downsample.1",
        "layer4.2.bn3",
        "fc",
    ]:
        assert n in names


def test_forward_shapes():
    x = torch.randn(2, 1, 8, 8)
    assert vit_tiny_digits()(x).shape == (2, 10)
    assert resnet_tiny_digits()(x).shape == (2, 10)


def test_digits_split_is_real_and_reproducible():
    a, b = load_digits_split(0), load_digits_split(0)
    assert a.x_train.shape[1:] == (1, 8, 8)
    assert len(a.x_train) + len(a.x_test) == 1797
    assert torch.equal(a.x_test, b.x_test) and torch.equal(a.y_train, b.y_train)
    assert abs(a.x_train.mean().item()) < 1e-4
    assert sorted(a.y_test.unique().tolist()) == list(range(10))
    batches = calibration_batches(a, batch_size=16, n_batches=3)
    assert len(batches) == 3 and batches[0].shape == (16, 1, 8, 8)


def test_validation_split_partitions_the_training_images_only():
    data = load_digits_split(0)
    sel = validation_split(data, 0.2, seed=0)
    assert len(sel.x_train) + len(sel.x_test) == len(data.x_train)
    assert abs(len(sel.x_test) - 0.2 * len(data.x_train)) <= 1
    rows = {tuple(r.tolist()) for r in data.x_train.flatten(1)}
    fit_rows = {tuple(r.tolist()) for r in sel.x_train.flatten(1)}
    val_rows = {tuple(r.tolist()) for r in sel.x_test.flatten(1)}
    assert fit_rows | val_rows <= rows and not fit_rows & val_rows
    assert sorted(sel.y_test.unique().tolist()) == list(range(10))
    assert torch.equal(validation_split(data, 0.2, seed=0).x_test, sel.x_test)
    with pytest.raises(ValueError, match="fraction"):
        validation_split(data, 1.0)


def test_apply_masks_checks_names_and_shapes():
    m = vit_tiny_digits()
    with pytest.raises(ValueError, match="not a module with a weight"):
        apply_masks(m, {"blocks.0.nothing": torch.ones(1)})
    with pytest.raises(ValueError, match="'head'"):
        apply_masks(m, {"head": torch.ones(3, 3)})


@pytest.mark.slow
@pytest.mark.parametrize("name", ["vit_tiny_digits", "resnet_tiny_digits"])
def test_pretrained_reaches_95_percent_and_is_cached(name):
    data = load_digits_split(0)
    model = pretrained(name, seed=0, progress=False)
    acc = evaluate(model, data.x_test, data.y_test)
    assert acc >= 0.95
    assert _checkpoint_path(name, 0).exists()
    again = pretrained(name, seed=0, progress=False)  # loaded from the cache, identical
    for (ka, va), (kb, vb) in zip(model.state_dict().items(), again.state_dict().items(), strict=True):
        assert ka == kb and torch.equal(va, vb)


def test_pretrained_with_validation_trains_without_the_held_out_images(tmp_path, monkeypatch):
    monkeypatch.setenv("KNSPARSE_CACHE", str(tmp_path))
    recipe = trainer.Recipe(epochs=1, lr=2e-3)
    monkeypatch.setitem(trainer.RECIPES, "one_epoch_vit", (vit_tiny_digits, recipe))
    assert _checkpoint_path("one_epoch_vit", 0, 0.2) != _checkpoint_path("one_epoch_vit", 0)
    held_out = pretrained("one_epoch_vit", seed=0, progress=False, validation=0.2)
    assert _checkpoint_path("one_epoch_vit", 0, 0.2).name.startswith("one_epoch_vit-val20-seed0-")
    torch.manual_seed(0)
    expected = train(vit_tiny_digits(), validation_split(load_digits_split(0), 0.2, 0), 1, progress=False)
    for a, b in zip(held_out.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b)


def test_unknown_model_name():
    with pytest.raises(ValueError, match="unknown built-in model"):
        pretrained("vit_huge")


def test_training_gives_the_same_weights_whatever_the_thread_count():
    data = load_digits_split(0)
    states = []
    before = torch.get_num_threads()
    for threads in (2, 1):
        torch.set_num_threads(threads)
        torch.manual_seed(0)
        model = resnet_tiny_digits()
        train(model, data, epochs=1, seed=0, progress=False)
        assert torch.get_num_threads() == threads  # restored after training
        states.append(model.state_dict())
    torch.set_num_threads(before)
    assert all(torch.equal(states[0][k], states[1][k]) for k in states[0])


def test_train_seed_changes_the_model_not_the_split(tmp_path, monkeypatch):
    monkeypatch.setenv("KNSPARSE_CACHE", str(tmp_path))
    recipe = trainer.Recipe(epochs=1, lr=2e-3)
    monkeypatch.setitem(trainer.RECIPES, "one_epoch_resnet", (resnet_tiny_digits, recipe))
    assert _checkpoint_path("one_epoch_resnet", 0, train_seed=0) == _checkpoint_path("one_epoch_resnet", 0)
    assert "-train1-" in _checkpoint_path("one_epoch_resnet", 0, train_seed=1).name
    other = pretrained("one_epoch_resnet", seed=0, progress=False, train_seed=1)
    torch.manual_seed(1)
    expected = train(resnet_tiny_digits(), load_digits_split(0), 1, seed=1, progress=False)
    for a, b in zip(other.state_dict().values(), expected.state_dict().values(), strict=True):
        assert torch.equal(a, b)
