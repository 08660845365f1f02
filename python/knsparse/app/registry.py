"""The CLI's model registry: a model name (a built-in, ``timm:NAME``) -> the model, its input
shape and a description, with a user's weights file loaded into it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODELS_HELP = (
    "vit_tiny_digits and resnet_tiny_digits (trained on the bundled digits, cached), "
    "vit_base_patch16_224 and resnet50 (ImageNet shapes, random weights), or timm:<name> "
    "(random weights; needs timm)"
)


class UserError(ValueError):
    """A mistake in the command line: reported in one line, exit status 2."""


@dataclass
class LoadedModel:
    model: nn.Module
    input_shape: tuple[int, int, int]  # (C, H, W)
    description: str


def _builtin(name: str, seed: int, weights: bool) -> LoadedModel:
    from .. import models
    from .trainer import pretrained

    digits = {"vit_tiny_digits": models.vit_tiny_digits, "resnet_tiny_digits": models.resnet_tiny_digits}
    imagenet = {"vit_base_patch16_224": models.vit_base_patch16_224, "resnet50": models.resnet50}
    if name in digits:
        if weights:  # the file supplies the weights: no need to train
            return LoadedModel(digits[name]().eval(), (1, 8, 8), name)
        return LoadedModel(pretrained(name, seed=seed), (1, 8, 8), f"{name} (trained on digits, seed {seed})")
    if name in imagenet:
        torch.manual_seed(seed)
        return LoadedModel(imagenet[name]().eval(), (3, 224, 224), f"{name} (random weights)")
    if name.startswith("timm:"):
        try:
            import timm
        except Exception as exc:  # timm or its torchvision dependency missing or broken
            raise UserError(f"model {name!r} needs timm (pip install 'knsparse[timm]'): {exc}") from exc
        try:
            model = timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
        except RuntimeError as exc:
            raise UserError(f"timm has no model {name.removeprefix('timm:')!r}") from exc
        c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return LoadedModel(model, (c, h, w), f"{name} (random weights)")
    raise UserError(f"unknown model {name!r}; choose {MODELS_HELP}")


def load_model(name: str, weights: str | None = None, seed: int = 0) -> LoadedModel:
    """A built-in or timm model, with ``weights`` (a ``knsparse prune`` output or a plain
    safetensors state dict of that architecture) loaded when given."""
    path = None if weights is None else Path(weights)
    if path is not None and not path.is_file():
        raise UserError(f"no weights file at {path}")
    loaded = _builtin(name, seed, path is not None)
    if path is None:
        return loaded
    from safetensors import SafetensorError, safe_open

    from ..io import load_sparse

    try:
        with safe_open(str(path), framework="pt") as f:
            has_sparse = "knsparse.sparse_layers" in (f.metadata() or {})
    except (SafetensorError, OSError) as exc:  # truncated, a pickle renamed, unreadable
        raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        if has_sparse:
            load_sparse(loaded.model, path)
        else:
            from safetensors.torch import load_file

            loaded.model.load_state_dict(load_file(str(path)))
    except (RuntimeError, KeyError, OSError, SafetensorError) as exc:  # load_state_dict mismatches
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} does not fit model {name!r}: {first}") from exc
    loaded.description = f"{name} with weights from {path}"
    return loaded
