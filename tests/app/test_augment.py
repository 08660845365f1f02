"""Few-image data: augmented views of a handful of photos (determinism, shapes, ranges, mixing
against solid-colour references, torch vs torchvision), used as prune's calibration set and
finetune's training set, from the API and from the CLI."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from knsparse.app.augment import Augment, AugmentedViews, torchvision_available
from knsparse.app.images import IMAGENET, Preprocess
from knsparse.app.photos import write_folder
from knsparse.cli import main

SMALL = Preprocess(40, (32, 24), IMAGENET.mean, IMAGENET.std)
PLAIN = Preprocess(16, (16, 16), (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))  # values stay in [0, 1]


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A flat folder of three bundled real photos (scikit-learn's and matplotlib's)."""
    folder = tmp_path_factory.mktemp("photos")
    write_folder(folder, ["china", "flower", "grace_hopper"])
    return folder


def _solid(path: Path, rgb: tuple[int, int, int]) -> Path:
    Image.fromarray(np.full((30, 40, 3), rgb, dtype=np.uint8)).save(path)
    return path


def test_views_are_deterministic_per_seed_and_index(photos: Path) -> None:
    a = AugmentedViews(photos, SMALL, 12, seed=3, backend="torch")
    b = AugmentedViews(sorted(photos.iterdir()), SMALL, 12, seed=3, backend="torch")
    backwards = [b[i] for i in reversed(range(12))][::-1]
    for i in range(12):
        torch.testing.assert_close(a[i], backwards[i], rtol=0, atol=0)
    other = AugmentedViews(photos, SMALL, 12, seed=4, backend="torch")
    assert not torch.equal(a.tensor(), other.tensor())
    torch.testing.assert_close(pickle.loads(pickle.dumps(a))[5], a[5], rtol=0, atol=0)  # DataLoader workers


def test_shapes_dtype_ranges_and_all_views_distinct(photos: Path) -> None:
    views = AugmentedViews(photos, SMALL, 24, seed=0, backend="torch")
    x = views.tensor()
    assert x.shape == (24, 3, 32, 24) and x.dtype == torch.float32 and len(views) == 24
    mean, std = torch.tensor(SMALL.mean).reshape(3, 1, 1), torch.tensor(SMALL.std).reshape(3, 1, 1)
    pixels = x * std + mean  # back to [0, 1]
    assert float(pixels.min()) >= -1e-5 and float(pixels.max()) <= 1 + 1e-5
    assert float(pixels.std()) > 0.05  # real image content, not a constant
    flat = x.flatten(1)
    distance = torch.cdist(flat, flat) + torch.eye(24) * 1e9
    assert float(distance.min()) > 1.0  # no two views alike
    batches = views.batches(10)
    assert [len(b) for b in batches] == [10, 10, 4]
    torch.testing.assert_close(torch.cat(batches), x, rtol=0, atol=0)


def test_mixing_really_mixes_two_photos(tmp_path: Path) -> None:
    red, blue = _solid(tmp_path / "red.png", (255, 0, 0)), _solid(tmp_path / "blue.png", (0, 0, 255))
    aug = Augment(jitter=0.0, mix=1.0)
    views = AugmentedViews([red, blue], PLAIN, 40, seed=0, augment=aug, backend="torch")
    kinds = set()
    for i in range(40):
        kind, lam, other = views.mixing(i)
        kinds.add(kind)
        assert other == 1 - i % 2  # mixed with the other photo
        x = views[i]
        own = lam if i % 2 == 0 else 1 - lam  # share of red
        if kind == "mixup":  # every pixel is own * colour + (1 - own) * other colour
            want = torch.tensor([own, 0.0, 1 - own]).reshape(3, 1, 1).expand_as(x)
            torch.testing.assert_close(x, want, rtol=0, atol=1e-5)
        else:  # pixels red or blue, in the stated shares
            is_red = x[0] > 0.5
            assert torch.all((x[0] + x[2] - 1).abs() < 1e-5) and float(x[1].abs().max()) < 1e-5
            assert abs(float(is_red.float().mean()) - own) < 1e-6
    assert kinds == {"mixup", "cutmix"}
    unmixed = AugmentedViews([red, blue], PLAIN, 4, augment=Augment(jitter=0.0, mix=0.0), backend="torch")
    assert all(unmixed.mixing(i) is None for i in range(4))
    torch.testing.assert_close(unmixed[1], torch.tensor([0.0, 0.0, 1.0]).reshape(3, 1, 1).expand(3, 16, 16))


def test_one_photo_mixes_with_other_views_of_itself(photos: Path) -> None:
    one = sorted(photos.iterdir())[0]
    views = AugmentedViews(one, SMALL, 8, augment=Augment(mix=1.0), backend="torch")
    assert {views.mixing(i)[2] for i in range(8)} == {0}
    plain = AugmentedViews(one, SMALL, 8, augment=Augment(mix=0.0), backend="torch")
    assert all(not torch.equal(views[i], plain[i]) for i in range(8))


@pytest.mark.models
def test_torchvision_and_torch_transforms_agree(photos: Path) -> None:
    if not torchvision_available():
        pytest.skip("torchvision is not installed")
    a = AugmentedViews(photos, SMALL, 16, seed=5, backend="torch").tensor()
    tv = AugmentedViews(photos, SMALL, 16, seed=5, backend="torchvision")
    torch.testing.assert_close(a, tv.tensor(), rtol=0, atol=1e-4)
    torch.testing.assert_close(pickle.loads(pickle.dumps(tv))[3], a[3], rtol=0, atol=1e-4)


def test_bad_arguments_name_what_is_wrong(tmp_path: Path, photos: Path) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match="holds no images"):
        AugmentedViews(empty, SMALL, 4)
    with pytest.raises(ValueError, match="views must be >= 1"):
        AugmentedViews(photos, SMALL, 0)
    with pytest.raises(ValueError, match="nope.jpg is not a file"):
        AugmentedViews([tmp_path / "nope.jpg"], SMALL, 4)
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
        AugmentedViews([broken], SMALL, 4)
    with pytest.raises(ValueError, match="backend"):
        AugmentedViews(photos, SMALL, 4, backend="pil")
    with pytest.raises(ValueError, match="mix must be in"):
        Augment(mix=1.5)
    with pytest.raises(TypeError, match="preprocess"):
        AugmentedViews(photos, (32, 32), 4)
    if not torchvision_available():
        with pytest.raises(ValueError, match="needs torchvision"):
            AugmentedViews(photos, SMALL, 4, backend="torchvision")


def _small_cnn() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    ).eval()  # fmt: skip


def test_views_calibrate_prune_and_train_finetune(photos: Path) -> None:
    import knsparse as ks

    views = AugmentedViews(photos, SMALL, 16, seed=0, backend="torch")
    model = _small_cnn()
    result = ks.prune(model, "wanda", calib=views.batches(8), progress=False)
    assert set(result.masks) == {"2", "6"}  # the first conv has K = 27 rows, not a multiple of 4
    student = result.model
    before = [m.weight.detach().clone() for m in (student[2], student[6])]
    out = ks.finetune(student, model, views, epochs=1, batch_size=8, plan=result.plan, progress=False)
    assert out.metrics[0]["images"] == 16
    for m, old in zip((student[2], student[6]), before, strict=True):
        assert torch.equal(m.weight == 0, old == 0) and not torch.equal(m.weight, old)


def test_cli_refuses_views_without_augment_and_augment_without_images(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = str(tmp_path / "p.safetensors")
    assert main(["prune", "--model", "resnet50", "--views", "4", "--out", out]) == 2
    assert "--views counts augmented views: it needs --augment" in capsys.readouterr().err
    assert main(["prune", "--model", "resnet50", "--augment", "--out", out]) == 2
    assert "give --data DIR" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["prune", "--model", "resnet50", "--augment", "--views", "0", "--out", out])
    assert "--views: must be >= 1" in capsys.readouterr().err
    assert main(["prune", "--model", "vit_tiny_digits", "--augment", "--out", out]) == 2
    assert "bundled digits" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    argv = ["finetune", "--model", "resnet50", "--weights", out, "--teacher-weights", out]
    assert main([*argv, "--data", str(empty), "--augment", "--out", out]) == 2
    assert "holds no images" in capsys.readouterr().err


@pytest.mark.models
def test_cli_prune_then_finetune_on_augmented_views(photos: Path, tmp_path: Path, capsys) -> None:
    pytest.importorskip("timm")
    from safetensors.torch import save_file

    from knsparse.app.registry import load_model

    model = "timm:test_efficientnet"  # timm's tiny test EfficientNet (160 px)
    teacher = tmp_path / "dense.safetensors"
    dense = load_model(model, None, 0).model
    save_file({k: v.contiguous() for k, v in dense.state_dict().items()}, str(teacher))
    pruned, tuned = tmp_path / "p.safetensors", tmp_path / "f.safetensors"
    base = ["--model", model, "--data", str(photos), "--augment", "--views", "8", "--quiet"]
    argv = ["prune", *base, "--weights", str(teacher), "--method", "wanda", "--calib-batch", "4"]
    assert main([*argv, "--out", str(pruned)]) == 0
    printed = capsys.readouterr().out
    assert f"calibration: 8 augmented views of 3 image(s) from {photos}" in printed
    argv = [
        "finetune",
        *base,
        "--weights",
        str(pruned),
        "--teacher-weights",
        str(teacher),
        "--val",
        str(photos),
    ]
    assert main([*argv, "--epochs", "1", "--batch-size", "4", "--out", str(tuned)]) == 0
    printed = capsys.readouterr().out
    assert "8 augmented views (seed 0) of 3 image(s)" in printed and "val agreement" in printed
    assert tuned.is_file()
    assert main([*argv, "--label-weight", "0.5", "--out", str(tuned)]) == 2
    assert "augmented views carry no labels" in capsys.readouterr().err
