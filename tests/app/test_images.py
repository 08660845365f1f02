"""A user's images: folder scanning, preprocessing against a plain reference, top-1, and the
CLI's --data / --val on a model that takes images."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from sklearn.datasets import load_digits
from torch import nn

from knsparse.app.images import IMAGENET, ImageFolder, Preprocess, load_image, logits_of, top1
from knsparse.cli import main


def write_digits(root: Path, per_class: int = 3, classes: int = 3, size: int = 64) -> Path:
    """Real digits, upscaled to ``size`` px RGB PNGs in one subfolder per class."""
    digits = load_digits()
    for c in range(classes):
        folder = root / f"class_{c}"
        folder.mkdir(parents=True)
        images = digits.images[digits.target == c][:per_class]
        for i, img in enumerate(images):
            pixels = (img / 16.0 * 255).astype(np.uint8)
            Image.fromarray(pixels).resize((size, size), Image.Resampling.NEAREST).convert("RGB").save(
                folder / f"{i}.png"
            )
    return root


def test_preprocess_matches_a_plain_reference(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, size=(40, 60, 3), dtype=np.uint8)
    path = tmp_path / "x.png"
    Image.fromarray(pixels).save(path)
    pre = Preprocess(40, (32, 32), (0.5, 0.4, 0.3), (0.2, 0.25, 0.3), "nearest")
    got = load_image(path, pre)
    # the shorter side is already 40: no resize; a centre crop of 32x32, then normalise
    top, left = (40 - 32) // 2, (60 - 32) // 2
    want = torch.from_numpy(pixels[top : top + 32, left : left + 32].astype(np.float32) / 255).permute(
        2, 0, 1
    )
    want = (want - torch.tensor(pre.mean).reshape(3, 1, 1)) / torch.tensor(pre.std).reshape(3, 1, 1)
    torch.testing.assert_close(got, want)
    assert IMAGENET(Image.fromarray(pixels)).shape == (3, 224, 224)
    assert Preprocess.from_crop_pct((224, 224), 0.875, mean=IMAGENET.mean, std=IMAGENET.std).resize == 256


def test_folders_with_classes_flat_and_broken(tmp_path: Path) -> None:
    labelled = ImageFolder.scan(write_digits(tmp_path / "a"))
    assert labelled.classes == ("class_0", "class_1", "class_2") and labelled.labels == (
        0,
        0,
        0,
        1,
        1,
        1,
        2,
        2,
        2,
    )
    flat = tmp_path / "flat"
    flat.mkdir()
    for p in list((tmp_path / "a" / "class_1").iterdir()):
        (flat / p.name).write_bytes(p.read_bytes())
    assert ImageFolder.scan(flat).labels is None
    with pytest.raises(ValueError, match="no class subfolders"):
        ImageFolder.scan(flat, labelled=True)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ValueError, match=f"{empty} holds no images"):
        ImageFolder.scan(empty)
    with pytest.raises(ValueError, match="does not exist"):
        ImageFolder.scan(tmp_path / "nope")
    (flat / "broken.png").write_bytes(b"not a png")
    with pytest.raises(ValueError, match="cannot decode image .*broken.png"):
        list(ImageFolder.scan(flat).batches(IMAGENET, 8))
    assert len(labelled.sample(4, seed=1)) == 4 and labelled.sample(4, seed=1) == labelled.sample(4, seed=1)


def test_top1_reads_logits_from_any_output(tmp_path: Path) -> None:
    folder = ImageFolder.scan(write_digits(tmp_path))
    pre = Preprocess(16, (16, 16), (0.5,) * 3, (0.5,) * 3)

    class Oracle(nn.Module):
        """Scores class = the label, recognised from the image's mean intensity rank (fixed table)."""

        def __init__(self, table: dict[float, int]) -> None:
            super().__init__()
            self.table, self.w = table, nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
            labels = [self.table[round(float(m), 4)] for m in x.mean((1, 2, 3))]
            return {"logits": F.one_hot(torch.tensor(labels), 3).float()}

    table = {}
    for x, y in folder.batches(pre, 100):
        table = {round(float(m), 4): int(label) for m, label in zip(x.mean((1, 2, 3)), y, strict=True)}
    assert top1(Oracle(table), folder, pre) == 1.0
    assert torch.equal(logits_of((torch.ones(2), 1)), torch.ones(2))
    with pytest.raises(TypeError):
        logits_of(3)


@pytest.mark.slow
def test_prune_with_user_images_and_val(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    images = write_digits(tmp_path / "imgs", per_class=2, classes=2, size=224)
    out = tmp_path / "p.safetensors"
    argv = [
        "prune",
        "--model",
        "resnet50",
        "--data",
        str(images),
        "--val",
        str(images),
        "--calib-images",
        "2",
    ]
    assert main([*argv, "--calib-batch", "2", "--repair", "bn", "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert f"top-1 on {images} (4 images)" in printed and "swapped" in printed and out.is_file()


def test_image_arguments_are_checked_first(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty = tmp_path / "empty"
    empty.mkdir()
    out = str(tmp_path / "p.safetensors")
    assert main(["prune", "--model", "resnet50", "--data", str(empty), "--out", out]) == 2
    assert "holds no images" in capsys.readouterr().err
    assert main(["prune", "--model", "resnet50", "--method", "cast", "--out", out]) == 2
    assert "give --data DIR" in capsys.readouterr().err
    imgs = write_digits(tmp_path / "imgs", per_class=1, classes=2, size=16)
    assert main(["prune", "--model", "vit_tiny_digits", "--data", str(imgs), "--out", out]) == 2
    assert "bundled digits" in capsys.readouterr().err
