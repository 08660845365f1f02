"""What the commands share: the parser that reports a mistake in one line, argument types, the
argument groups several commands take, and the output-path checks made before any work starts."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

from ..app.registry import MODELS_HELP, UserError
from ..core.checks import check_number
from ..core.pattern import Pattern
from ..core.quant import QUANT_DTYPES


class Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (``knsparse prune: error: argument ...``);
    with ``usage_on_error`` (the top-level ``knsparse``: no or an unknown command) the usage
    line comes first, as plain argparse prints it."""

    usage_on_error = False

    def error(self, message: str) -> NoReturn:
        usage = self.format_usage() if self.usage_on_error else ""
        self.exit(2, f"{usage}{self.prog}: error: {message}\n")


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def real(**bounds: object) -> Callable[[str], float]:
    """argparse type: a finite float within ``bounds`` (:func:`knsparse.core.checks.check_number`'s)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_number(value, "the value", **bounds)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("the value ")) from None

    parse.__name__ = "number"
    return parse


def batch_sizes_arg(text: str) -> tuple[int, ...]:
    """argparse type: comma-separated positive batch sizes (``"1,8,32"``)."""
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"batch sizes must be comma-separated integers, got {text!r}"
        ) from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def pattern_arg(text: str) -> Pattern:
    """argparse type: a k:n pattern (``"2:4"``)."""
    try:
        return Pattern.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


def _creatable(folder: Path, flag: str) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag}: {existing} is a file, so {folder} cannot be created")
    try:  # a real write: permission bits do not bind root, and /proc or a read-only mount refuse anyway
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise UserError(f"{flag}: cannot write into {existing} ({exc.strerror or exc})") from None


def writable_file(path: str, flag: str = "--out") -> Path:
    """``path`` as a file this run can write (not a folder, its folder creatable), else ``UserError``:
    checked before any work starts."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name")
    _creatable(out.parent, flag)
    return out


def writable_folder(path: str, flag: str = "--out") -> Path:
    """``path`` as a folder this run can create or write into, else ``UserError``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is an existing file; give a folder")
    _creatable(out, flag)
    return out


def model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    """``--model``, ``--weights``, ``--seed``."""
    p.add_argument("--model", required=required, help=f"the architecture: {MODELS_HELP}")
    p.add_argument(
        "--weights", help="safetensors file to load into it (a 'knsparse prune' output or a state dict)"
    )
    p.add_argument(
        "--seed", type=at_least(0), default=0, help="data split / training / random-weights seed (default 0)"
    )


def quiet_arg(p: argparse.ArgumentParser) -> None:
    """``--quiet``."""
    p.add_argument("--quiet", action="store_true", help="no progress bars")


def augment_args(p: argparse.ArgumentParser, what: str) -> None:
    """``--augment`` and ``--views`` (few-image ``what`` data from an image folder)."""
    p.add_argument(
        "--augment",
        action="store_true",
        help=f"{what} on augmented views of the --data images (random resized crops, flips, colour "
        "jitter, CutMix/MixUp; seeded by --seed): a handful of photos is enough",
    )
    p.add_argument(
        "--views",
        type=at_least(1),
        help=f"with --augment: how many augmented views (default {DEFAULT_VIEWS})",
    )


DEFAULT_VIEWS = 128
"""Augmented views of ``--augment`` without ``--views``."""


def views_of(args: argparse.Namespace, images: object, preprocess: object) -> object | None:
    """The :class:`~knsparse.app.augment.AugmentedViews` that ``--augment`` / ``--views`` ask for
    (``None`` without ``--augment``), ``images`` being the source photos (paths or a folder);
    ``UserError`` for ``--views`` without ``--augment`` or ``--augment`` without images."""
    from ..app.augment import AugmentedViews

    check_augment(args, images is not None)
    if not args.augment:
        return None
    if preprocess is None:
        raise UserError(f"--augment is for models that take images; {args.model} uses the bundled digits")
    try:
        return AugmentedViews(images, preprocess, args.views or DEFAULT_VIEWS, seed=args.seed)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def check_augment(args: argparse.Namespace, has_folder: bool) -> None:
    """``--views`` without ``--augment``, or ``--augment`` without an image folder: ``UserError``
    (checked before any work starts)."""
    if args.views is not None and not args.augment:
        raise UserError("--views counts augmented views: it needs --augment")
    if args.augment and not has_folder:
        raise UserError("--augment makes views of your photos: give --data DIR (a folder of images)")


def quantize_arg(g: argparse._ActionsContainer) -> None:
    """``--quantize int8|fp8`` (prune: the recipe's ``quantize`` field; export: Q/DQ ONNX)."""
    g.add_argument(
        "--quantize",
        choices=QUANT_DTYPES,
        help="post-training quantization after pruning: symmetric per-output-channel weights, per-tensor "
        "activation scales (max or percentile, chosen on held-out calibration batches); export writes "
        "Q/DQ ONNX for TensorRT's explicit quantization",
    )


def calibration_args(p: argparse.ArgumentParser) -> None:
    """``--data``, ``--calib-images``, ``--calib-batch``: calibration images for a model that is
    not one of the digits models (those calibrate on the bundled digits)."""
    p.add_argument(
        "--data",
        metavar="DIR",
        help="calibration images: a folder with class subfolders, or a flat folder of images, "
        "preprocessed as the model expects (not for the *_digits models, which use the bundled digits)",
    )
    p.add_argument(
        "--calib-images",
        type=at_least(1),
        default=128,
        help="images drawn from --data (seeded; default 128)",
    )
    p.add_argument("--calib-batch", type=at_least(1), default=16, help="calibration batch size (default 16)")


def read_calibration(folder: object, preprocess: object, args: argparse.Namespace, quiet: bool) -> list:
    """The calibration batches of ``--data`` (an :class:`~knsparse.app.images.ImageFolder`):
    ``--calib-images`` images drawn with ``--seed``, in batches of ``--calib-batch``."""
    from tqdm.auto import tqdm

    chosen = folder.sample(args.calib_images, seed=args.seed)
    return list(
        tqdm(
            chosen.batches(preprocess, args.calib_batch),
            desc="read images",
            disable=quiet,
            total=-(-len(chosen) // args.calib_batch),
        )
    )
