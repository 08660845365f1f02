"""Real photographs that ship inside installed packages (nothing is downloaded).

scikit-learn's ``load_sample_images`` files (``china.jpg``, ``flower.jpg``), matplotlib's
``sample_data/grace_hopper.jpg`` and, when scikit-image is installed, the photographs among its
bundled ``skimage.data`` files: a handful of real images to calibrate, distil and check an ImageNet
model on. Synthetic test images (chessboards, logos, phantoms, rendered text) and the right view of
scikit-image's stereo motorcycle pair (a near copy of the left one) are left out.
"""

from __future__ import annotations

import importlib.util
import shutil
from pathlib import Path

PHOTOS: dict[str, tuple[str, str]] = {
    "china": ("sklearn", "datasets/images/china.jpg"),
    "flower": ("sklearn", "datasets/images/flower.jpg"),
    "grace_hopper": ("matplotlib", "mpl-data/sample_data/grace_hopper.jpg"),
    "astronaut": ("skimage", "data/astronaut.png"),
    "chelsea": ("skimage", "data/chelsea.png"),
    "coffee": ("skimage", "data/coffee.png"),
    "rocket": ("skimage", "data/rocket.jpg"),
    "motorcycle": ("skimage", "data/motorcycle_left.png"),
    "hubble_deep_field": ("skimage", "data/hubble_deep_field.jpg"),
    "retina": ("skimage", "data/retina.jpg"),
    "ihc": ("skimage", "data/ihc.png"),
    "camera": ("skimage", "data/camera.png"),
    "coins": ("skimage", "data/coins.png"),
    "moon": ("skimage", "data/moon.png"),
    "brick": ("skimage", "data/brick.png"),
    "grass": ("skimage", "data/grass.png"),
    "gravel": ("skimage", "data/gravel.png"),
    "cell": ("skimage", "data/cell.png"),
    "clock_motion": ("skimage", "data/clock_motion.png"),
}
"""``{name: (package, path inside it)}`` of every photograph this module knows."""


def _package_root(package: str) -> Path | None:
    spec = importlib.util.find_spec(package)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def bundled_photos(names: list[str] | tuple[str, ...] | None = None) -> dict[str, Path]:
    """``{name: file}`` of the installed photographs (all of :data:`PHOTOS` whose package is
    installed), or exactly ``names``: ``ValueError`` naming an unknown photo or the package a
    requested one needs."""
    unknown = sorted(set(names or ()) - set(PHOTOS))
    if unknown:
        raise ValueError(f"unknown photo(s) {unknown}; known: {sorted(PHOTOS)}")
    out = {}
    for name in names or PHOTOS:
        package, inner = PHOTOS[name]
        root = _package_root(package)
        path = None if root is None else root / inner
        if path is None or not path.is_file():
            if names is None:
                continue
            raise ValueError(
                f"photo {name!r} ships with {package}, which is not installed (or lacks {inner})"
            )
        out[name] = path
    return out


def write_folder(folder: str | Path, names: list[str] | tuple[str, ...] | None = None) -> list[Path]:
    """Copy the photographs into ``folder`` (a flat folder of images, e.g. for ``--data``); the
    copied paths, sorted."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    photos = bundled_photos(names)
    return sorted(
        Path(shutil.copyfile(path, folder / f"{name}{path.suffix}")) for name, path in photos.items()
    )
