"""Built-in timm-shaped models and the bundled-digits trainer."""

from .digits import DigitsSplit, calibration_batches, load_digits_split, validation_split
from .resnet import ResNet, resnet50, resnet_tiny_digits
from .trainer import apply_masks, evaluate, pretrained, train
from .vit import VisionTransformer, vit_base_patch16_224, vit_tiny_digits

__all__ = [
    "DigitsSplit",
    "ResNet",
    "VisionTransformer",
    "apply_masks",
    "calibration_batches",
    "evaluate",
    "load_digits_split",
    "pretrained",
    "resnet50",
    "resnet_tiny_digits",
    "train",
    "validation_split",
    "vit_base_patch16_224",
    "vit_tiny_digits",
]
