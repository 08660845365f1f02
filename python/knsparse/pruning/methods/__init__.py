"""Mask methods and their registry.

Every method maps ``(layers, pattern, sparsity, **options)`` to one
:class:`~knsparse.pruning.methods.base.Decision` per layer (``pattern`` is a :class:`Pattern`, or
``None`` for unstructured masks at ``sparsity``); :func:`knsparse.prune` validates a call
against the method's :class:`MethodSpec` before it touches the model.

A method is a scorer (:mod:`knsparse.score`, or the data-path scores of calibration) + a
budget (the pattern, a sparsity, or :mod:`knsparse.budget`'s per-layer allocation) + a mask
rule (:func:`~knsparse.pruning.methods.select.select` for score-based methods; CAST's group selection),
optionally followed by new values for the kept weights (``rmt``; ``sparsegpt`` and ``cast``
(``reconstruct=True``, its default) re-fit them on the calibration Gram,
:mod:`knsparse.pruning.methods.obs`).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Literal

from ...core.pattern import Pattern
from .base import Decision, Layer
from .cast import cast, greedy_group_select
from .magnitude import magnitude
from .rmt import rmt
from .select import select
from .ser import hybrid, ser
from .sparsegpt import sparsegpt
from .wanda import wanda
from .yopo import yopo

MethodFn = Callable[..., Mapping[str, Decision]]

DEFAULT_KN_METHOD = "sparsegpt-refit"
"""knsparse's recommended one-shot k:n method: SparseGPT's masks with the kept weights re-solved
exactly by least squares. Chosen on held-out data: the re-fit's mean validation gain over plain
``sparsegpt`` is positive (``bench/oneshot_quality.py``; ``bench/results/oneshot_quality.md``)."""


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
    full_gram: bool | str = False
    """The method needs each layer's full ``K × K`` input Gram; a string names the boolean option
    that asks for it (``cast``'s ``reconstruct``)."""
    layerwise: bool = False
    """Each layer's decision depends on that layer alone, so layers can be decided one after the
    other on the outputs of the already pruned ones (``prune(sequential=True)``)."""
    fixed: Mapping[str, object] = field(default_factory=dict)
    """Options this registry entry pins (``cast-conv`` is ``cast`` with ``convs=True``)."""

    @property
    def options(self) -> frozenset[str]:
        """Keyword options a caller may pass."""
        params = inspect.signature(self.fn).parameters.values()
        names = {p.name for p in params if p.kind is inspect.Parameter.KEYWORD_ONLY}
        return frozenset(names - set(self.fixed))

    def needs_full_gram(self, options: Mapping[str, object]) -> bool:
        """Whether a call with ``options`` needs the full Gram (:attr:`full_gram`)."""
        if isinstance(self.full_gram, str):
            default = inspect.signature(self.fn).parameters[self.full_gram].default
            return bool(options.get(self.full_gram, default))
        return self.full_gram

    def __call__(
        self, layers: Mapping[str, Layer], pattern: Pattern | None, sparsity: float | None, **options: object
    ) -> Mapping[str, Decision]:
        return self.fn(layers, pattern, sparsity, **self.fixed, **options)

    def accepts(self, pattern: Pattern | None) -> bool:
        """Whether the method makes k:n masks (``pattern``) or unstructured ones (``None``)."""
        if self.patterns == "both":
            return True
        return (pattern is None) == (self.patterns == "unstructured")


METHODS: dict[str, MethodSpec] = {
    "magnitude": MethodSpec(magnitude, "unused", "both"),
    "yopo": MethodSpec(yopo, "unused", "both"),
    "rmt": MethodSpec(rmt, "unused", "both"),
    "ser": MethodSpec(ser, "optional", "unstructured"),
    "hybrid": MethodSpec(hybrid, "optional", "unstructured"),
    "wanda": MethodSpec(wanda, "required", "both", layerwise=True),
    "sparsegpt": MethodSpec(sparsegpt, "required", "kn", full_gram=True, layerwise=True),
    "sparsegpt-refit": MethodSpec(
        sparsegpt, "required", "kn", full_gram=True, layerwise=True, fixed={"refit": True}
    ),
    "cast": MethodSpec(
        cast, "required", "kn", group_gram=True, premask=True, full_gram="reconstruct", layerwise=True
    ),
    "cast-conv": MethodSpec(
        cast,
        "required",
        "kn",
        group_gram=True,
        premask=True,
        full_gram="reconstruct",
        layerwise=True,
        fixed={"convs": True},
    ),
}

__all__ = [
    "DEFAULT_KN_METHOD",
    "METHODS",
    "Decision",
    "Layer",
    "MethodSpec",
    "cast",
    "greedy_group_select",
    "hybrid",
    "magnitude",
    "rmt",
    "select",
    "ser",
    "sparsegpt",
    "wanda",
    "yopo",
]
