"""Argument checks shared by the public functions: each names the argument it rejects.

A public function checks its arguments here first, so a bad one ends in a ``TypeError`` /
``ValueError`` that names it, never in a raw ``RuntimeError`` or ``ZeroDivisionError`` deep
inside torch.
"""

from __future__ import annotations

import math
import os
from collections.abc import Collection, Iterable, Sequence
from pathlib import Path
from typing import Literal

import torch
from torch import nn


def check_number(
    value: object,
    arg: str,
    *,
    low: float | None = None,
    high: float | None = None,
    low_open: bool = False,
    high_open: bool = False,
    integer: bool = False,
) -> float:
    """``value`` as a float (an int when ``integer``) if it is a finite real number within
    ``[low, high]`` (open ends where asked); else ``TypeError``/``ValueError`` naming ``arg``."""
    kinds = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kinds):
        want = "an int" if integer else "a real number"
        raise TypeError(f"{arg} must be {want}, got {type(value).__name__} {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{arg} must be finite, got {value}")
    too_low = low is not None and (value <= low if low_open else value < low)
    too_high = high is not None and (value >= high if high_open else value > high)
    if too_low or too_high:
        if high is None:
            span = f"{'>' if low_open else '>='} {low}"
        elif low is None:
            span = f"{'<' if high_open else '<='} {high}"
        else:
            span = f"in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"
        raise ValueError(f"{arg} must be {span}, got {value}")
    return value


def check_tensor(
    t: object, arg: str, *, floating: bool = True, dims: Collection[int] | None = None
) -> torch.Tensor:
    """``t`` if it is a non-empty tensor with values (not on the meta device), real, floating
    point when ``floating`` (else any real dtype), of one of ``dims`` dimensions when given."""
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{arg} must be a torch.Tensor, got {type(t).__name__}")
    if dims is not None and t.dim() not in dims:
        want = " or ".join(f"{d}-D" for d in sorted(dims))
        raise ValueError(f"{arg} must be {want}, got shape {tuple(t.shape)}")
    if t.is_meta:
        raise ValueError(f"{arg} is on the meta device: it holds no values")
    if t.numel() == 0:
        raise ValueError(f"{arg} is empty (shape {tuple(t.shape)})")
    if t.is_complex():
        raise TypeError(f"{arg} must be real, got {t.dtype}")
    if floating and not t.is_floating_point():
        raise TypeError(f"{arg} must be floating point, got {t.dtype}")
    return t


FLOAT_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The floating dtypes knsparse computes and exports in, by name: the one table of them."""


MetaRule = Literal["any", "refuse", "whole"]
"""What :func:`check_module` accepts of tensors on the meta device (shapes without data):
``"any"``; ``"refuse"`` none (a stage that reads or writes weights); ``"whole"`` a model wholly on
meta or wholly on real devices (a shape-only count), not a mix."""


def meta_layers(model: nn.Module) -> tuple[list[str], bool]:
    """(names of the modules holding a parameter or buffer on the meta device, in
    ``named_modules`` order with ``""`` for the model itself; whether any tensor is elsewhere)."""
    names: list[str] = []
    real = False
    for name, module in model.named_modules():
        own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
        if any(t.is_meta for _, t in own):
            names.append(name)
        real = real or any(not t.is_meta for _, t in own)
    return names, real


def check_module(model: object, arg: str = "model", *, meta: MetaRule = "any") -> nn.Module:
    """``model`` if it is an ``nn.Module``; else ``TypeError`` naming ``arg``. With ``meta``
    (:data:`MetaRule`), a ``ValueError`` naming the first layer on the meta device (whose weights
    are shapes without data) where the rule refuses it, before anything changes."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"{arg} must be an nn.Module, got {type(model).__name__}")
    if meta == "any":
        return model
    names, real = meta_layers(model)
    if names and (meta == "refuse" or real):
        first = names[0]
        module = model.get_submodule(first)
        what = f"layer {first!r}" if first else "the model"
        what += f" ({type(module).__name__})"
        others = f" (and {len(names) - 1} more layers)" if len(names) > 1 else ""
        why = (
            " while other layers hold real tensors: a shape-only count needs the whole model on meta "
            "or none of it"
            if meta == "whole"
            else ": its weights have no data, only shapes"
        )
        raise ValueError(
            f"{arg}: {what} is on the meta device{others}{why}; build the model on a real device or "
            "load its weights with load_state_dict(..., assign=True)"
        )
    return model


def check_flag(value: object, arg: str) -> bool:
    """``value`` if it is a bool (not merely truthy); else ``TypeError`` naming ``arg``."""
    if not isinstance(value, bool):
        raise TypeError(f"{arg} must be True or False, got {type(value).__name__} {value!r}")
    return value


def check_choice(value: object, arg: str, choices: Collection[str]) -> str:
    """``value`` if it is one of the str ``choices``; else ``TypeError``/``ValueError`` naming
    ``arg`` and the choices."""
    known = ", ".join(repr(c) for c in choices)
    if not isinstance(value, str):
        raise TypeError(f"{arg} must be one of {known}, got {type(value).__name__} {value!r}")
    if value not in choices:
        raise ValueError(f"{arg} must be one of {known}, got {value!r}")
    return value


def check_path(value: object, arg: str) -> Path:
    """``value`` as a ``Path`` if it is a str or ``os.PathLike``; else ``TypeError`` naming ``arg``."""
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"{arg} must be a path (str or os.PathLike), got {type(value).__name__}")
    return Path(value)


def check_device(value: object, arg: str = "device") -> torch.device:
    """``value`` as a ``torch.device`` (a device, a name such as ``"cuda:0"``, or a CUDA index);
    else ``TypeError``/``ValueError`` naming ``arg``."""
    if isinstance(value, bool) or not isinstance(value, (str, int, torch.device)):
        want = "a torch.device, a device name or an index"
        raise TypeError(f"{arg} must be {want}, got {type(value).__name__}")
    try:
        device = torch.device(value)
    except RuntimeError as exc:
        raise ValueError(f"{arg} {value!r} is not a device: {exc}") from None
    if device.type == "cuda" and (
        not torch.cuda.is_available() or (device.index or 0) >= torch.cuda.device_count()
    ):
        raise ValueError(f"{arg} {value!r}: no such CUDA device here ({torch.cuda.device_count()} visible)")
    return device


def check_ints(value: object, arg: str, *, low: int | None = None) -> tuple[int, ...]:
    """``value`` (a list/tuple/``torch.Size`` of ints, not a str) as a tuple of ints ``>= low``;
    else ``TypeError``/``ValueError`` naming ``arg`` (and the entry)."""
    if isinstance(value, (str, bytes)) or not isinstance(value, Sequence):
        raise TypeError(f"{arg} must be a sequence of ints, got {type(value).__name__} {value!r}")
    return tuple(int(check_number(v, f"{arg}[{i}]", low=low, integer=True)) for i, v in enumerate(value))


def check_image_shape(value: object, arg: str = "input_shape") -> tuple[int, int, int, int]:
    """``(B, C, H, W)`` from an image shape ``(C, H, W)`` (batch 1) or ``(B, C, H, W)`` of
    positive ints; else ``TypeError``/``ValueError`` naming ``arg``."""
    shape = check_ints(value, arg, low=1)
    if len(shape) not in (3, 4):
        raise ValueError(f"{arg} must be (C, H, W) or (B, C, H, W), got {tuple(shape)}")
    return (1, *shape) if len(shape) == 3 else shape  # type: ignore[return-value]


def check_names(value: object, arg: str) -> tuple[str, ...]:
    """Names (layer names or glob patterns) as a tuple: a single str is one name, else an
    iterable of str; anything else is a ``TypeError`` naming ``arg``."""
    if isinstance(value, str):
        return (value,)
    if not isinstance(value, Iterable):
        raise TypeError(f"{arg} must be a str or an iterable of str, got {type(value).__name__}")
    names = tuple(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise TypeError(f"{arg} must hold str names, got {bad[:3]!r}")
    return names
