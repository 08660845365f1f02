"""Mask methods and their registry.

Every method maps ``(layers, pattern, sparsity, **options)`` to one
:class:`~knsparse.methods.base.Decision` per layer; :func:`knsparse.prune` validates a call
against the method's :class:`MethodSpec` before it touches the model.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Literal

from ..pattern import Pattern
from .base import Decision, Layer
from .cast import cast, cast_conv, greedy_group_select
from .magnitude import magnitude
from .rmt import rmt
from .ser import hybrid, ser

MethodFn = Callable[..., Mapping[str, Decision]]


@dataclass(frozen=True)
class MethodSpec:
    fn: MethodFn
    calib: Literal["required", "optional", "unused"]
    """Whether the method's masks need, can use, or ignore calibration statistics."""
    patterns: Literal["kn", "unstructured", "both"]
    group_gram: bool = False
    """The method needs the ``n × n`` input Gram blocks of every group."""
    premask: bool = False
    """A k:n call may also take ``sparsity`` (an unstructured pre-mask)."""

    @property
    def options(self) -> frozenset[str]:
        params = inspect.signature(self.fn).parameters.values()
        return frozenset(p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY)

    def accepts(self, pattern: Pattern) -> bool:
        if self.patterns == "both":
            return True
        return pattern.is_unstructured == (self.patterns == "unstructured")


METHODS: dict[str, MethodSpec] = {
    "magnitude": MethodSpec(magnitude, "unused", "both"),
    "rmt": MethodSpec(rmt, "unused", "both"),
    "ser": MethodSpec(ser, "optional", "unstructured"),
    "hybrid": MethodSpec(hybrid, "optional", "unstructured"),
    "cast": MethodSpec(cast, "required", "kn", group_gram=True, premask=True),
    "cast-conv": MethodSpec(cast_conv, "required", "kn", group_gram=True, premask=True),
}

__all__ = [
    "METHODS",
    "Decision",
    "Layer",
    "MethodSpec",
    "cast",
    "cast_conv",
    "greedy_group_select",
    "hybrid",
    "magnitude",
    "rmt",
    "ser",
]
