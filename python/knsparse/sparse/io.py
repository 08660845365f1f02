"""Save and load swapped models through safetensors (no pickle).

The file holds the model's full ``state_dict`` plus, in the safetensors metadata, the
description of every sparse layer (kind, pattern, conv order, requested backend, fused
activation). Loading takes a dense model of the same architecture, checks the whole file
against it — readable safetensors, well-formed metadata, every tensor's name, shape and dtype,
finite values, slots that are valid k:n positions — and only then swaps the listed layers for
sparse twins and loads the tensors, so a file either loads exactly or changes nothing.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

from .. import backends
from ..backends.base import ACTIVATIONS
from ..core.checks import check_module, check_path
from ..core.layers import ineligibility, placement_reasons
from ..core.pattern import Pattern
from ..core.plan import SparsityPlan, permutations_from_json
from .fuse import absorb_activation, check_fusable
from .modules import SparseConv2d, SparseLinear, _SparseLayer, set_submodule, sparse_layers

_META_KEY = "knsparse.sparse_layers"
_PLAN_KEY = "knsparse.plan"
_KINDS = {"linear": nn.Linear, "conv2d": nn.Conv2d}
_FIELDS = {"kind", "pattern", "conv_order", "backend", "activation"}


@dataclass(frozen=True)
class _LayerInfo:
    """One sparse layer as the file's metadata describes it."""

    kind: str
    pattern: str
    conv_order: str
    backend: str
    activation: str


def save_sparse(model: nn.Module, path: str | Path, plan: SparsityPlan | None = None) -> None:
    """Write ``model``'s tensors and its sparse-layer description to ``path`` (safetensors);
    with the ``plan`` it was pruned by, also the plan's pattern, conv order, channel permutation
    and recipe (:func:`saved_plan` reads them; the masks are the sparse layers' slots)."""
    check_module(model, meta="refuse")
    if plan is not None and not isinstance(getattr(plan, "plan", plan), SparsityPlan):
        raise TypeError(f"plan must be a SparsityPlan (prune(...).plan), got {type(plan).__name__}")
    check_path(path, "path")
    if Path(path).is_dir():
        raise ValueError(f"path {str(path)!r} is a folder; give a file name")
    if not Path(path).parent.is_dir():
        raise ValueError(f"path {str(path)!r}: folder {str(Path(path).parent)!r} does not exist")
    layers = {}
    for name, layer in sparse_layers(model).items():
        layers[name] = {
            "kind": "linear" if isinstance(layer, SparseLinear) else "conv2d",
            "pattern": str(layer.pattern),
            "conv_order": layer.conv_order,
            "backend": layer.backend_request,
            "activation": layer.activation if isinstance(layer, SparseLinear) else "none",
        }
    # clone: tied weights share storage, which safetensors refuses to write
    tensors = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    metadata = {_META_KEY: json.dumps(layers)}
    if plan is not None:
        metadata[_PLAN_KEY] = json.dumps(getattr(plan, "plan", plan).metadata())
    save_file(tensors, str(path), metadata=metadata)


def saved_plan(model: nn.Module, path: str | Path) -> SparsityPlan | None:
    """The plan a :func:`save_sparse` file was written with, for ``model`` after
    :func:`load_sparse` of that file (its masks are the model's sparse layers' masks), or
    ``None`` when the file holds no plan. ``ValueError`` naming the file when the record is
    broken or names layers the model does not hold as sparse layers."""
    check_module(model)
    path = str(check_path(path, "path"))
    meta, _ = _read(path)
    if _PLAN_KEY not in meta:
        return None
    try:
        record = json.loads(meta[_PLAN_KEY])
        pattern = Pattern.parse(record["pattern"], record["conv_order"])
        permutation = permutations_from_json(record["permutation"])
        recipe, layers = record["recipe"], record["layers"]
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as exc:
        raise ValueError(f"{path}: metadata {_PLAN_KEY!r} is not a knsparse plan record: {exc}") from None
    swapped = sparse_layers(model)
    missing = sorted(set(layers) - set(swapped))
    if missing:
        raise ValueError(
            f"{path}: the plan names layers the model does not hold as sparse layers: {missing[:5]}"
        )
    masks = {name: swapped[name].mask() for name in layers}
    return SparsityPlan(pattern, masks, permutation, recipe)


def load_sparse(model: nn.Module, path: str | Path, backend: str | None = None) -> nn.Module:
    """Load a file written by :func:`save_sparse` into ``model`` (a dense model of the same
    architecture), swapping its sparse layers in place; ``backend`` overrides the saved request.

    Raises:
        ValueError: the file is missing, unreadable, truncated or not safetensors; its metadata
            is broken; a tensor is missing, unexpected, of the wrong shape or dtype, holds
            NaN/Inf, or a sparse layer's slots repeat inside a group or reach past ``n``. The
            message names the file and the tensor or layer; the model is left untouched.
    """
    check_module(model, meta="refuse")
    if backend is not None and backend != "auto" and backend not in backends.names():
        raise ValueError(f"backend must be None, 'auto' or one of {backends.names()}, got {backend!r}")
    path = str(check_path(path, "path"))
    meta, tensors = _read(path)
    infos = _layer_infos(path, meta)
    planned = _plan(path, model, infos, backend)
    _check_tensors(path, model, planned, tensors)
    _check_slots(path, planned, tensors)
    for name, new in planned.items():
        set_submodule(model, name, new)
        if infos[name].activation != "none":
            absorb_activation(model, name, infos[name].activation)
    model.load_state_dict(tensors, strict=True)
    return model


def _read(path: str) -> tuple[dict[str, str], dict[str, torch.Tensor]]:
    """The file's metadata and tensors, or ``ValueError`` naming the file."""
    if not Path(path).is_file():
        raise ValueError(f"{path}: no such file")
    try:
        with safe_open(path, framework="pt") as f:
            meta = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iterator)
    except (SafetensorError, OSError, RuntimeError, ValueError, TypeError, OverflowError) as exc:
        raise ValueError(
            f"{path}: not a readable safetensors file (truncated, corrupted, or a pickle?): "
            f"{type(exc).__name__}: {exc}"
        ) from exc
    if _META_KEY not in meta:
        raise ValueError(f"{path} was not written by knsparse.save_sparse (no {_META_KEY!r} metadata)")
    return meta, tensors


def _layer_infos(path: str, meta: dict[str, str]) -> dict[str, _LayerInfo]:
    """The sparse-layer descriptions of the metadata, each field checked."""
    where = f"{path}: metadata {_META_KEY!r}"
    try:
        raw = json.loads(meta[_META_KEY])
    except json.JSONDecodeError as exc:
        raise ValueError(f"{where} is not valid JSON: {exc}") from exc
    if not isinstance(raw, dict):
        raise ValueError(f"{where} must be a JSON object of layers, got {type(raw).__name__}")
    infos = {}
    for name, info in raw.items():
        label = f"{where}, layer {name!r}"
        if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
            raise ValueError(f"{label}: expected an object of string fields, got {info!r}")
        info = {"activation": "none", **info}  # files from before fused activations lack it
        if set(info) != _FIELDS:
            raise ValueError(f"{label}: fields {sorted(info)}, expected {sorted(_FIELDS)}")
        if info["kind"] not in _KINDS:
            raise ValueError(f"{label}: kind {info['kind']!r}, expected one of {sorted(_KINDS)}")
        orders = ("rsc", "crs") if info["kind"] == "conv2d" else ("rsc",)  # a Linear has no conv order
        if info["conv_order"] not in orders:
            raise ValueError(f"{label}: conv_order {info['conv_order']!r}, expected one of {orders}")
        allowed = ACTIVATIONS if info["kind"] == "linear" else ("none",)
        if info["activation"] not in allowed:
            raise ValueError(f"{label}: activation {info['activation']!r} is not valid for a {info['kind']}")
        if info["backend"] != "auto" and info["backend"] not in backends.names():
            raise ValueError(f"{label}: backend {info['backend']!r}, expected 'auto' or {backends.names()}")
        infos[name] = _LayerInfo(**info)
    return infos


def _plan(
    path: str, model: nn.Module, infos: dict[str, _LayerInfo], backend: str | None
) -> dict[str, _SparseLayer]:
    """An empty sparse twin (same device, dtype, training flag) for every layer of the file."""
    modules = dict(model.named_modules(remove_duplicate=False))
    placement = placement_reasons(model)
    planned: dict[str, _SparseLayer] = {}
    for name, info in infos.items():
        dense = modules.get(name)
        label = f"{path}: layer {name!r}"
        if not isinstance(dense, _KINDS[info.kind]):
            raise ValueError(f"{label} is a {info.kind} there, but the model has {dense!r}")
        reason = ineligibility(dense) or placement.get(name)
        if reason:
            raise ValueError(f"{label}: the model's layer cannot be sparse: {reason}")
        w = dense.weight
        try:
            if info.activation != "none":
                check_fusable(model, name, info.activation)
            if isinstance(dense, nn.Linear):
                new: _SparseLayer = SparseLinear(
                    dense.in_features,
                    dense.out_features,
                    info.pattern,
                    dense.bias is not None,
                    backend or info.backend,
                    w.dtype,
                    w.device,
                    activation=info.activation,
                )
            else:
                new = SparseConv2d(
                    dense.in_channels,
                    dense.out_channels,
                    dense.kernel_size,
                    dense.stride,
                    dense.padding,
                    dense.dilation,
                    info.pattern,
                    dense.bias is not None,
                    info.conv_order,
                    backend or info.backend,
                    w.dtype,
                    w.device,
                )
        except (ValueError, TypeError) as exc:
            raise ValueError(f"{label}: {exc}") from exc
        new.train(dense.training)
        if dense.bias is not None:
            new.bias.requires_grad_(dense.bias.requires_grad)
        planned[name] = new
    return planned


def _check_tensors(
    path: str, model: nn.Module, swaps: dict[str, _SparseLayer], tensors: dict[str, torch.Tensor]
) -> None:
    """``ValueError`` unless the file's tensors are exactly the state of ``model`` with ``swaps``
    applied (same keys, shapes and dtypes) and hold no NaN/Inf; checked before any change."""
    expected = dict(model.state_dict())
    for name, new in swaps.items():
        for key in [k for k in expected if k.startswith(f"{name}.")]:
            del expected[key]
        expected.update({f"{name}.{k}": v for k, v in new.state_dict().items()})
    missing = sorted(expected.keys() - tensors.keys())
    unexpected = sorted(tensors.keys() - expected.keys())
    wrong = [
        f"{k}: file {tuple(tensors[k].shape)} {tensors[k].dtype}, model {tuple(v.shape)} {v.dtype}"
        for k, v in expected.items()
        if k in tensors and (tensors[k].shape != v.shape or tensors[k].dtype != v.dtype)
    ]
    if missing or unexpected or wrong:
        raise ValueError(
            f"{path} does not fit this model (nothing was changed): missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}, shape/dtype mismatches {wrong[:5]}"
        )
    for key, t in tensors.items():
        if (t.is_floating_point() or t.is_complex()) and not torch.isfinite(t).all():
            raise ValueError(f"{path}: tensor {key!r} holds NaN or Inf (nothing was changed)")


def _check_slots(path: str, swaps: dict[str, _SparseLayer], tensors: dict[str, torch.Tensor]) -> None:
    """Every group's slots must be distinct positions ``< n`` in ascending order (as
    :func:`knsparse.core.compress.compress_nm` writes them): a repeated slot would drop weights."""
    for name, layer in swaps.items():
        key = f"{name}.slots"
        k, n = layer.pattern.k, layer.pattern.n
        groups = tensors[key].to(torch.int16).reshape(tensors[key].shape[0], -1, k)
        if (groups >= n).any():
            row, group, _ = (groups >= n).nonzero()[0].tolist()
            raise ValueError(
                f"{path}: tensor {key!r} holds slot index {int(groups.max())} >= n={n} "
                f"(first at row {row}, group {group}); nothing was changed"
            )
        if (groups.diff(dim=-1) <= 0).any():
            row, group, _ = (groups.diff(dim=-1) <= 0).nonzero()[0].tolist()
            raise ValueError(
                f"{path}: tensor {key!r}: slots repeat or are out of order inside a group of "
                f"{layer.pattern} (first at row {row}, group {group}: {groups[row, group].tolist()}); "
                "nothing was changed"
            )


__all__ = ["load_sparse", "save_sparse", "saved_plan"]
