"""A user's images: a folder (class subfolders, or flat for calibration only) read with Pillow
and preprocessed the way the model expects.

:class:`Preprocess` is the usual evaluation transform of image classifiers — resize the
shorter side, center-crop, scale to [0, 1], normalise per channel — with its numbers taken from
the model's own source (timm's pretrained config, torchvision's weights transforms, a Hugging
Face ``preprocessor_config.json``) or ImageNet's defaults. Labels follow the folder convention of
``ImageFolder``: class subfolders sorted by name are classes 0, 1, 2, ...
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

IMAGE_SUFFIXES = frozenset(
    {".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff", ".ppm", ".pgm"}
)
_RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
}


@dataclass(frozen=True)
class Preprocess:
    """Resize the shorter side to ``resize`` pixels, center-crop ``crop`` = (H, W), scale to
    [0, 1] and normalise with ``mean`` / ``std`` (one value per channel)."""

    resize: int
    crop: tuple[int, int]
    mean: tuple[float, ...]
    std: tuple[float, ...]
    interpolation: str = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in _RESAMPLE:
            raise ValueError(f"interpolation must be one of {sorted(_RESAMPLE)}, got {self.interpolation!r}")
        if len(self.mean) != len(self.std) or len(self.mean) not in (1, 3):
            raise ValueError(f"mean and std need 1 or 3 values each, got {self.mean} and {self.std}")
        if self.resize < min(self.crop):
            raise ValueError(f"resize {self.resize} is smaller than the crop {self.crop}")

    @property
    def channels(self) -> int:
        return len(self.mean)

    @classmethod
    def from_crop_pct(cls, crop: tuple[int, int], crop_pct: float, **kwargs: object) -> Preprocess:
        """timm's convention: resize the shorter side to ``floor(crop / crop_pct)``."""
        return cls(math.floor(min(crop) / crop_pct), crop, **kwargs)

    def __call__(self, image: Image.Image) -> torch.Tensor:
        """``[C, H, W]`` float32 of one image."""
        image = image.convert("RGB" if self.channels == 3 else "L")
        w, h = image.size
        scale = self.resize / min(w, h)
        size = (max(self.crop[1], round(w * scale)), max(self.crop[0], round(h * scale)))
        image = image.resize(size, _RESAMPLE[self.interpolation])
        left, top = (size[0] - self.crop[1]) // 2, (size[1] - self.crop[0]) // 2
        image = image.crop((left, top, left + self.crop[1], top + self.crop[0]))
        pixels = torch.from_numpy(np.asarray(image, dtype=np.float32).copy()) / 255.0
        pixels = pixels.reshape(self.crop[0], self.crop[1], -1).permute(2, 0, 1)
        mean = torch.tensor(self.mean).reshape(-1, 1, 1)
        std = torch.tensor(self.std).reshape(-1, 1, 1)
        return (pixels - mean) / std


IMAGENET = Preprocess(256, (224, 224), (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
"""ImageNet's usual evaluation transform (resize 256, crop 224), for models that name none."""


@dataclass(frozen=True)
class ImageFolder:
    """The images of a folder: ``paths`` in a fixed order, ``labels`` (class index per image)
    and ``classes`` (subfolder names) when it has class subfolders, else ``None`` / ``()``."""

    root: Path
    paths: tuple[Path, ...]
    labels: tuple[int, ...] | None
    classes: tuple[str, ...]

    @classmethod
    def scan(cls, root: str | Path, *, labelled: bool = False) -> ImageFolder:
        """Class subfolders of images, or (unless ``labelled``) a flat folder of images.

        ``ValueError`` naming the folder when it does not exist, holds no image, or (with
        ``labelled``) has no class subfolders."""
        root = Path(root)
        if not root.is_dir():
            raise ValueError(f"image folder {root} does not exist or is not a folder")
        subfolders = sorted(p for p in root.iterdir() if p.is_dir() and _images_in(p))
        if subfolders:
            paths, labels = [], []
            for index, folder in enumerate(subfolders):
                found = _images_in(folder)
                paths += found
                labels += [index] * len(found)
            return cls(root, tuple(paths), tuple(labels), tuple(p.name for p in subfolders))
        if labelled:
            raise ValueError(
                f"image folder {root} has no class subfolders with images: evaluation needs "
                "one subfolder per class (sorted names are classes 0, 1, 2, ...)"
            )
        flat = _images_in(root)
        if not flat:
            raise ValueError(f"image folder {root} holds no images ({', '.join(sorted(IMAGE_SUFFIXES))})")
        return cls(root, tuple(flat), None, ())

    def __len__(self) -> int:
        return len(self.paths)

    def sample(self, n: int | None, seed: int = 0) -> ImageFolder:
        """``n`` images drawn without replacement (seeded), all of them for ``None`` or ``n >= len``."""
        if n is None or n >= len(self):
            return self
        if n < 1:
            raise ValueError(f"the number of images must be >= 1, got {n}")
        chosen = sorted(random.Random(seed).sample(range(len(self)), n))
        labels = None if self.labels is None else tuple(self.labels[i] for i in chosen)
        return ImageFolder(self.root, tuple(self.paths[i] for i in chosen), labels, self.classes)

    def batches(
        self, preprocess: Preprocess, batch_size: int
    ) -> Iterator[torch.Tensor | tuple[torch.Tensor, torch.Tensor]]:
        """``[B, C, H, W]`` image batches, with ``[B]`` int64 labels when the folder has classes.

        ``ValueError`` naming the file for an image Pillow cannot decode."""
        for start in range(0, len(self), batch_size):
            chunk = self.paths[start : start + batch_size]
            x = torch.stack([load_image(p, preprocess) for p in chunk])
            if self.labels is None:
                yield x
            else:
                yield x, torch.tensor(self.labels[start : start + batch_size], dtype=torch.int64)


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES)


def load_image(path: Path, preprocess: Preprocess) -> torch.Tensor:
    """One preprocessed image ``[C, H, W]``; ``ValueError`` naming the file if it cannot be decoded."""
    try:
        with Image.open(path) as image:
            image.load()
            return preprocess(image)
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc


def logits_of(output: object) -> torch.Tensor:
    """The class scores in a model's output: a tensor, a Hugging Face ``ModelOutput`` /
    mapping (``logits``) or a tuple (its first tensor)."""
    if isinstance(output, torch.Tensor):
        return output
    logits = output.get("logits") if isinstance(output, Mapping) else getattr(output, "logits", None)
    if isinstance(logits, torch.Tensor):
        return logits
    if isinstance(output, (tuple, list)) and output and isinstance(output[0], torch.Tensor):
        return output[0]
    raise TypeError(f"cannot find class scores in a model output of type {type(output).__name__}")


@torch.no_grad()
def top1(model: torch.nn.Module, folder: ImageFolder, preprocess: Preprocess, batch_size: int = 32) -> float:
    """Fraction of ``folder``'s images (class subfolders) whose highest-scoring class index is
    the folder's label. The model runs in eval mode; its training flags are restored after."""
    from ..utils.modes import evaluation

    if folder.labels is None:
        raise ValueError(f"image folder {folder.root} has no class subfolders to score top-1 against")
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    correct = 0
    with evaluation(model):
        for x, y in folder.batches(preprocess, batch_size):
            scores = logits_of(model(x.to(device)))
            if scores.shape[-1] <= int(y.max()):
                raise ValueError(
                    f"image folder {folder.root} has {len(folder.classes)} classes but the model scores "
                    f"only {scores.shape[-1]}"
                )
            correct += int((scores.argmax(-1).cpu() == y).sum())
    return correct / len(folder)
