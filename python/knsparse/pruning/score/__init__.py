"""Saliency scores: ``{layer name: scores}`` in each weight's shape, higher = more important."""

from .layers import prunable_weights
from .magnitude import magnitude
from .yopo import yopo, yopo_nm_masks

__all__ = ["magnitude", "prunable_weights", "yopo", "yopo_nm_masks"]
