"""Magnitude saliency: the score of a weight is its absolute value."""

from __future__ import annotations

from collections.abc import Iterable

import torch

from .layers import ModelOrWeights, prunable_weights


def magnitude(
    model_or_weights: ModelOrWeights, layers: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{name: |W|}`` as float32 in each weight's shape, for the layers of :func:`prunable_weights`."""
    return {name: w.abs().float() for name, w in prunable_weights(model_or_weights, layers).items()}
