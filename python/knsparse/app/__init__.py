"""The app on top of the library: the bundled digits data, the trainer of the built-in models,
the demo pipeline and report, and the CLI's model registry and commands. May import anything;
nothing in the library imports it."""

from .data import DigitsSplit, calibration_batches, load_digits_split, validation_split
from .trainer import evaluate, pretrained, train

__all__ = [
    "DigitsSplit",
    "calibration_batches",
    "evaluate",
    "load_digits_split",
    "pretrained",
    "train",
    "validation_split",
]
