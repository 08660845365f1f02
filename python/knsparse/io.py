"""Save and load swapped models through safetensors (no pickle).

The file holds the model's full ``state_dict`` plus, in the safetensors metadata, the
description of every sparse layer (kind, pattern, conv order, requested backend, fused
activation). Loading
takes a dense model of the same architecture, swaps the listed layers for empty sparse
twins, and loads the tensors strictly, so the round trip is exact.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from .fuse import absorb_activation, check_fusable
from .modules import SparseConv2d, SparseLinear, set_submodule, sparse_layers

_META_KEY = "knsparse.sparse_layers"


def save_sparse(model: nn.Module, path: str | Path) -> None:
    """Write ``model``'s tensors and its sparse-layer description to ``path`` (safetensors)."""
    layers = {}
    for name, layer in sparse_layers(model).items():
        layers[name] = {
            "kind": "linear" if isinstance(layer, SparseLinear) else "conv2d",
            "pattern": str(layer.pattern),
            "conv_order": layer.conv_order,
            "backend": layer.backend_request,
            "activation": layer.activation if isinstance(layer, SparseLinear) else "none",
        }
    tensors = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(tensors, str(path), metadata={_META_KEY: json.dumps(layers)})


def load_sparse(model: nn.Module, path: str | Path, backend: str | None = None) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (a dense model of the same
    architecture), swapping its sparse layers in place; ``backend`` overrides the saved request.
    A file that does not fit the model raises ``ValueError`` before anything is changed."""
    path = str(path)
    with safe_open(path, framework="pt") as f:
        meta = f.metadata() or {}
        if _META_KEY not in meta:
            raise ValueError(f"{path} was not written by knsparse.save_sparse (no {_META_KEY!r} metadata)")
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    modules = dict(model.named_modules())
    planned: dict[str, tuple[nn.Module, str]] = {}
    for name, info in json.loads(meta[_META_KEY]).items():
        dense = modules.get(name)
        wanted = nn.Linear if info["kind"] == "linear" else nn.Conv2d
        if not isinstance(dense, wanted):
            raise ValueError(f"{path}: layer {name!r} is a {info['kind']} there, but the model has {dense!r}")
        requested = backend or info["backend"]
        activation = info.get("activation", "none")  # files from before fused activations lack it
        if f"{name}.values" not in tensors:
            raise ValueError(f"{path}: no tensor {name}.values for sparse layer {name!r}")
        w = tensors[f"{name}.values"]
        if isinstance(dense, nn.Linear):
            if activation != "none":
                check_fusable(model, name, activation)
            new: nn.Module = SparseLinear(
                dense.in_features,
                dense.out_features,
                info["pattern"],
                dense.bias is not None,
                requested,
                w.dtype,
                activation=activation,
            )
        else:
            new = SparseConv2d(
                dense.in_channels,
                dense.out_channels,
                dense.kernel_size,
                dense.stride,
                dense.padding,
                dense.dilation,
                info["pattern"],
                dense.bias is not None,
                info["conv_order"],
                requested,
                w.dtype,
            )
        planned[name] = (new, activation)
    _check_fits(path, model, {n: new for n, (new, _) in planned.items()}, tensors)
    for name, (new, activation) in planned.items():
        set_submodule(model, name, new)
        if activation != "none":
            absorb_activation(model, name, activation)
    model.load_state_dict(tensors, strict=True)
    return model


def _check_fits(
    path: str, model: nn.Module, swaps: dict[str, nn.Module], tensors: dict[str, torch.Tensor]
) -> None:
    """``ValueError`` unless the file's tensors are exactly the state of ``model`` with ``swaps``
    applied (same keys, same shapes), checked before the model is changed."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    for name, new in swaps.items():
        for key in [k for k in expected if k.startswith(f"{name}.")]:
            del expected[key]
        expected.update({f"{name}.{k}": tuple(v.shape) for k, v in new.state_dict().items()})
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    shapes = [
        f"{k}: file {tuple(tensors[k].shape)}, model {expected[k]}"
        for k in sorted(expected.keys() & tensors.keys())
        if tuple(tensors[k].shape) != expected[k]
    ]
    if missing or unexpected or shapes:
        raise ValueError(
            f"{path} does not fit this model (nothing was changed): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape mismatches {shapes[:5]}"
        )


__all__ = ["load_sparse", "save_sparse"]
