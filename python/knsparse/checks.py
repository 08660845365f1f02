"""Argument checks shared by the public functions: each names the argument it rejects.

A public function checks its arguments here first, so a bad one ends in a ``TypeError`` /
``ValueError`` that names it, never in a raw ``RuntimeError`` or ``ZeroDivisionError`` deep
inside torch.
"""

from __future__ import annotations

import math
from collections.abc import Collection

import torch


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
        left = "(" if low_open else "["
        right = ")" if high_open else "]"
        span = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
        raise ValueError(f"{arg} must be in {span}, got {value}")
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
