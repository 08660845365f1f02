"""Few-image calibration and distillation data: many augmented views of a handful of photos.

One image with heavy augmentation is enough to distil an ImageNet model (Asano & Saeed,
"Extrapolating from a single image to a thousand classes using distillation", ICLR 2022): the
student learns the teacher's outputs on crops, flips, colour changes and mixes of a few photos.
:class:`AugmentedViews` is that data set: view ``i`` of ``N`` is drawn from source photo
``i mod len(sources)`` by

1. a random resized crop (torchvision's ``RandomResizedCrop`` rule: area fraction in ``scale``,
   log-uniform aspect ratio in ``ratio``, ten tries, then the central crop of the nearest
   allowed ratio), resized to the model's input size with antialiased bilinear interpolation;
2. a horizontal flip with probability ``flip``;
3. colour jitter: brightness, contrast and saturation each scaled by a factor uniform in
   ``[1 - jitter, 1 + jitter]`` (torchvision's ``adjust_*`` formulas, values clamped to [0, 1]);
4. with probability ``mix``, mixing with a view (steps 1-3) of another source photo (another
   view of the same photo when there is one source): MixUp (``λ·a + (1 - λ)·b``) or CutMix (a box
   of ``b`` with area fraction ``1 - λ`` pasted into ``a``), one of the two with equal chance,
   ``λ ~ Beta(mix_alpha, mix_alpha)``;
5. normalisation with the model's :class:`~knsparse.app.images.Preprocess` ``mean`` / ``std``.

Every random number of view ``i`` comes from ``numpy.random.default_rng([seed, i])``: a view is
the same tensor whatever order or process reads it. The crop/flip/jitter run on torch tensors
(``backend="torch"``) or through ``torchvision.transforms.v2.functional`` (``"torchvision"``,
the default when it imports); both apply the same parameters with the same formulas.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image, UnidentifiedImageError

from ..core.checks import check_choice, check_number
from .images import IMAGE_SUFFIXES, ImageFolder, Preprocess

BACKENDS = ("auto", "torch", "torchvision")
_GRAY = (0.2989, 0.587, 0.114)  # torchvision's rgb_to_grayscale weights


@dataclass(frozen=True)
class Augment:
    """The augmentation's strengths (see the module docstring for what each does)."""

    scale: tuple[float, float] = (0.25, 1.0)
    """Area fraction of the source photo a crop covers (low, high)."""
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    """Aspect ratio (width / height) range of a crop."""
    flip: float = 0.5
    jitter: float = 0.4
    mix: float = 0.5
    mix_alpha: float = 1.0

    def __post_init__(self) -> None:
        for name in ("scale", "ratio"):
            low, high = getattr(self, name)
            check_number(low, f"{name}[0]", low=0, low_open=True)
            check_number(high, f"{name}[1]", low=low)
        check_number(self.scale[1], "scale[1]", high=1)
        check_number(self.flip, "flip", low=0, high=1)
        check_number(self.jitter, "jitter", low=0, high=1)
        check_number(self.mix, "mix", low=0, high=1)
        check_number(self.mix_alpha, "mix_alpha", low=0, low_open=True)


def _read(path: Path, channels: int, longest: int) -> torch.Tensor:
    """``[C, h, w]`` float32 in [0, 1] of one photo, shrunk (antialiased) so that its shorter
    side is at most ``longest`` pixels; ``ValueError`` naming an undecodable file."""
    try:
        with Image.open(path) as image:
            image = image.convert("RGB" if channels == 3 else "L")
            w, h = image.size
            if min(w, h) > longest:
                s = longest / min(w, h)
                image = image.resize((max(1, round(w * s)), max(1, round(h * s))), Image.Resampling.BILINEAR)
            pixels = np.asarray(image, dtype=np.float32).copy()
    except (UnidentifiedImageError, OSError, SyntaxError) as exc:
        raise ValueError(f"cannot decode image {path}: {exc}") from exc
    return torch.from_numpy(pixels / 255.0).reshape(pixels.shape[0], pixels.shape[1], -1).permute(2, 0, 1)


def _sources(images: str | Path | Sequence[str | Path]) -> tuple[Path, ...]:
    if isinstance(images, (str, Path)):
        if Path(images).is_dir():
            return ImageFolder.scan(images).paths
        images = [images]
    if not isinstance(images, Sequence) or isinstance(images, (str, bytes)):
        raise TypeError(f"images must be a folder, a file or a list of files, got {type(images).__name__}")
    paths = tuple(Path(p) for p in images)
    if not paths:
        raise ValueError("images: no image given (a folder, a file or a list of files)")
    for p in paths:
        if not p.is_file():
            raise ValueError(f"images: {p} is not a file")
        if p.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"images: {p} is not an image file ({', '.join(sorted(IMAGE_SUFFIXES))})")
    return paths


def _crop_box(rng: np.random.Generator, h: int, w: int, aug: Augment) -> tuple[int, int, int, int]:
    """``(top, left, height, width)`` of a random resized crop (torchvision's rule)."""
    area = h * w
    log_ratio = (math.log(aug.ratio[0]), math.log(aug.ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*aug.scale)
        ratio = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * ratio)), round(math.sqrt(target / ratio))
        if 0 < cw <= w and 0 < ch <= h:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    ratio = w / h
    if ratio < aug.ratio[0]:
        cw, ch = w, round(w / aug.ratio[0])
    elif ratio > aug.ratio[1]:
        ch, cw = h, round(h * aug.ratio[1])
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def _blend(a: torch.Tensor, b: torch.Tensor | float, factor: float) -> torch.Tensor:
    return (factor * a + (1.0 - factor) * b).clamp_(0.0, 1.0)


def _gray(x: torch.Tensor) -> torch.Tensor:
    if x.shape[0] == 1:
        return x
    return (_GRAY[0] * x[0] + _GRAY[1] * x[1] + _GRAY[2] * x[2]).unsqueeze(0)


class _TorchOps:
    """Crop-resize, flip and colour adjustments on ``[C, h, w]`` tensors in [0, 1]."""

    @staticmethod
    def resized_crop(x: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]) -> torch.Tensor:
        top, left, h, w = box
        patch = x[:, top : top + h, left : left + w].unsqueeze(0)
        out = F.interpolate(patch, size=size, mode="bilinear", align_corners=False, antialias=True)
        return out.squeeze(0).clamp_(0.0, 1.0)

    @staticmethod
    def hflip(x: torch.Tensor) -> torch.Tensor:
        return x.flip(-1)

    @staticmethod
    def brightness(x: torch.Tensor, f: float) -> torch.Tensor:
        return _blend(x, 0.0, f)

    @staticmethod
    def contrast(x: torch.Tensor, f: float) -> torch.Tensor:
        return _blend(x, _gray(x).mean(), f)

    @staticmethod
    def saturation(x: torch.Tensor, f: float) -> torch.Tensor:
        return x if x.shape[0] == 1 else _blend(x, _gray(x), f)


class _TorchvisionOps:
    """The same operations through ``torchvision.transforms.v2.functional``."""

    def __init__(self) -> None:
        from torchvision.transforms.v2 import functional

        self.tf = functional

    def resized_crop(
        self, x: torch.Tensor, box: tuple[int, int, int, int], size: tuple[int, int]
    ) -> torch.Tensor:
        top, left, h, w = box
        mode = self.tf.InterpolationMode.BILINEAR
        out = self.tf.resized_crop(x, top, left, h, w, list(size), interpolation=mode, antialias=True)
        return out.clamp_(0.0, 1.0)

    def hflip(self, x: torch.Tensor) -> torch.Tensor:
        return self.tf.horizontal_flip(x)

    def brightness(self, x: torch.Tensor, f: float) -> torch.Tensor:
        return self.tf.adjust_brightness(x, f)

    def contrast(self, x: torch.Tensor, f: float) -> torch.Tensor:
        return self.tf.adjust_contrast(x, f)

    def saturation(self, x: torch.Tensor, f: float) -> torch.Tensor:
        return x if x.shape[0] == 1 else self.tf.adjust_saturation(x, f)


def torchvision_available() -> bool:
    """Whether ``torchvision.transforms.v2`` imports (a broken torchvision counts as absent)."""
    try:
        import torchvision.transforms.v2.functional  # noqa: F401
    except Exception:
        return False
    return True


class AugmentedViews(torch.utils.data.Dataset):
    """``views`` augmented views of a few photos, each ``[C, H, W]`` float32 normalised as
    ``preprocess`` wants (``C, (H, W) = preprocess.channels, preprocess.crop``).

    Args:
        images: a folder of images (flat, or class subfolders: the labels are not used), one
            image file, or a list of them.
        preprocess: the model's preprocessing (its crop size, mean and std).
        views: how many views (the data set's length), ``>= 1``.
        seed: view ``i`` is a function of ``(seed, i)`` alone.
        augment: the strengths (:class:`Augment`).
        backend: ``"torch"``, ``"torchvision"`` or ``"auto"`` (torchvision when it imports).

    The photos are decoded once, shrunk to a shorter side of at most ``2 * preprocess.resize``.
    ``ValueError`` names the folder without images, the file that is missing or undecodable, or
    a bad ``views``; nothing is read lazily after construction.
    """

    def __init__(
        self,
        images: str | Path | Sequence[str | Path],
        preprocess: Preprocess,
        views: int,
        seed: int = 0,
        augment: Augment | None = None,
        backend: str = "auto",
    ) -> None:
        if not isinstance(preprocess, Preprocess):
            raise TypeError(f"preprocess must be a knsparse Preprocess, got {type(preprocess).__name__}")
        check_number(views, "views", low=1, integer=True)
        check_number(seed, "seed", low=0, integer=True)
        check_choice(backend, "backend", BACKENDS)
        if augment is None:
            augment = Augment()
        elif not isinstance(augment, Augment):
            raise TypeError(f"augment must be an Augment, got {type(augment).__name__}")
        if backend == "auto":
            backend = "torchvision" if torchvision_available() else "torch"
        elif backend == "torchvision" and not torchvision_available():
            raise ValueError("backend='torchvision' needs torchvision installed (or use backend='torch')")
        self.paths = _sources(images)
        self.preprocess, self.views, self.seed, self.augment, self.backend = (
            preprocess, views, seed, augment, backend,
        )  # fmt: skip
        self._ops = _TorchvisionOps() if backend == "torchvision" else _TorchOps()
        self._photos = [_read(p, preprocess.channels, 2 * preprocess.resize) for p in self.paths]
        self._mean = torch.tensor(preprocess.mean, dtype=torch.float32).reshape(-1, 1, 1)
        self._std = torch.tensor(preprocess.std, dtype=torch.float32).reshape(-1, 1, 1)

    def __len__(self) -> int:
        return self.views

    def __getstate__(self) -> dict:
        """Picklable (DataLoader workers under spawn): the transform functions are rebuilt."""
        return {k: v for k, v in self.__dict__.items() if k != "_ops"}

    def __setstate__(self, state: dict) -> None:
        self.__dict__.update(state)
        self._ops = _TorchvisionOps() if self.backend == "torchvision" else _TorchOps()

    def _view(self, rng: np.random.Generator, source: int) -> torch.Tensor:
        """Steps 1-3 on source photo ``source``: ``[C, H, W]`` in [0, 1]."""
        photo, aug, ops = self._photos[source], self.augment, self._ops
        box = _crop_box(rng, photo.shape[1], photo.shape[2], aug)
        x = ops.resized_crop(photo, box, self.preprocess.crop)
        if rng.random() < aug.flip:
            x = ops.hflip(x)
        factors = rng.uniform(1 - aug.jitter, 1 + aug.jitter, size=3)
        for op, f in zip((ops.brightness, ops.contrast, ops.saturation), factors, strict=True):
            x = op(x, float(f))
        return x

    def mixing(self, index: int) -> tuple[str, float, int] | None:
        """How view ``index`` is mixed: ``(kind, λ, other source)`` with kind ``"mixup"`` or
        ``"cutmix"`` and ``λ`` the share of its own source, or ``None`` when it is not."""
        return self._draw(index)[1]

    def _draw(self, index: int) -> tuple[torch.Tensor, tuple[str, float, int] | None]:
        if not 0 <= index < self.views:
            raise IndexError(f"view {index} of {self.views}")
        rng = np.random.default_rng([self.seed, index])
        n = len(self._photos)
        source = index % n
        x = self._view(rng, source)
        if rng.random() >= self.augment.mix:
            return x, None
        other = source if n == 1 else int((source + rng.integers(1, n)) % n)
        y = self._view(rng, other)
        lam = float(rng.beta(self.augment.mix_alpha, self.augment.mix_alpha))
        if rng.random() < 0.5:
            return _blend(x, y, lam), ("mixup", lam, other)
        h, w = x.shape[1:]
        ch, cw = round(h * math.sqrt(1 - lam)), round(w * math.sqrt(1 - lam))
        top, left = int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1))
        x = x.clone()
        x[:, top : top + ch, left : left + cw] = y[:, top : top + ch, left : left + cw]
        return x, ("cutmix", 1 - ch * cw / (h * w), other)

    def __getitem__(self, index: int) -> torch.Tensor:
        x, _ = self._draw(index)
        return ((x - self._mean) / self._std).contiguous()

    def batches(self, batch_size: int) -> list[torch.Tensor]:
        """All views as ``[B, C, H, W]`` batches in order (the last one may be smaller): a
        re-iterable calibration set for :func:`knsparse.prune`."""
        check_number(batch_size, "batch_size", low=1, integer=True)
        return [
            torch.stack([self[i] for i in range(start, min(start + batch_size, self.views))])
            for start in range(0, self.views, batch_size)
        ]

    def tensor(self) -> torch.Tensor:
        """All views stacked: ``[views, C, H, W]``."""
        return torch.stack([self[i] for i in range(self.views)])
