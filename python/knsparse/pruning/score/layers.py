"""Which weights get scored: the prunable layers of a model (:mod:`knsparse.core.layers`) or a
dict of weights."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

import torch
from torch import nn

from ...core.checks import check_names, check_tensor
from ...core.layers import prunable_layers
from ...core.masks import check_finite

ModelOrWeights = nn.Module | Mapping[str, torch.Tensor]


def prunable_weights(
    model_or_weights: ModelOrWeights, layers: Iterable[str] | None = None
) -> dict[str, torch.Tensor]:
    """``{module name: weight}`` for the Linear / Conv2d layers (or the given ``{name: weight}``).

    Weights are returned detached, not copied; the model is never modified. ``layers`` restricts
    the result to those names (in the model's order). Raises ``ValueError`` naming the layer for an
    unknown name, a weight that is not 2-D ``[out, in]`` / 4-D ``[Cout, Cin, R, S]``, or a weight
    with NaN or Inf entries.
    """
    if isinstance(model_or_weights, nn.Module):
        found = {name: m.weight.detach() for name, m in prunable_layers(model_or_weights).items()}
        kind = "prunable Linear or Conv2d layer"
    elif isinstance(model_or_weights, Mapping):
        found = {}
        for name, w in model_or_weights.items():
            if not isinstance(w, torch.Tensor):
                raise TypeError(f"layer {name!r}: expected a tensor, got {type(w).__name__}")
            found[name] = w.detach()
        kind = "weight"
    else:
        raise TypeError(
            "model_or_weights must be an nn.Module or a {name: weight} dict, "
            f"got {type(model_or_weights).__name__}"
        )
    if layers is not None:
        wanted = list(check_names(layers, "layers"))
        unknown = [n for n in wanted if n not in found]
        if unknown:
            raise ValueError(f"unknown layers {unknown}; the {kind}s are {sorted(found)}")
        found = {n: found[n] for n in found if n in set(wanted)}
    if not found:
        raise ValueError(f"no {kind} to score")
    for name, w in found.items():
        check_tensor(w, f"layer {name!r}: weight", floating=False)
        if w.dim() not in (2, 4):
            raise ValueError(
                f"layer {name!r}: expected a 2-D Linear or 4-D Conv2d weight, got shape {tuple(w.shape)}"
            )
        if not w.is_floating_point():
            raise TypeError(f"layer {name!r}: weight dtype {w.dtype} is not floating point")
        check_finite(w, f"layer {name!r}")
    return found
