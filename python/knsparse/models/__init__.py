"""Built-in timm-shaped architectures (ViT, ResNet): used by the app, the benchmarks and the
tests, never by a library stage."""

from .resnet import ResNet, resnet50, resnet_tiny_digits
from .vit import VisionTransformer, vit_base_patch16_224, vit_tiny_digits

__all__ = [
    "ResNet",
    "VisionTransformer",
    "resnet50",
    "resnet_tiny_digits",
    "vit_base_patch16_224",
    "vit_tiny_digits",
]
