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
    spectra: Literal["never", "always", "premask"] = "never"
    """Whether the method reads each layer's Marchenko–Pastur fit (``Layer.fit``): never,
    always, or only with an unstructured pre-mask (``cast`` with ``sparsity``)."""

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

    def needs_spectra(self, sparsity: float | None) -> bool:
        """Whether a call at ``sparsity`` reads the layers' MP fits."""
        return self.spectra == "always" or (self.spectra == "premask" and sparsity is not None)

    def accepts(self, pattern: Pattern | None) -> bool:
        """Whether the method makes k:n masks (``pattern``) or unstructured ones (``None``)."""
        if self.patterns == "both":
            return True
        return (pattern is None) == (self.patterns == "unstructured")


METHODS: dict[str, MethodSpec] = {
    "magnitude": MethodSpec(magnitude, "unused", "both"),
    "yopo": MethodSpec(yopo, "unused", "both"),
    "rmt": MethodSpec(rmt, "unused", "both", spectra="always"),
    "ser": MethodSpec(ser, "optional", "unstructured", spectra="always"),
    "hybrid": MethodSpec(hybrid, "optional", "unstructured", spectra="always"),
    "wanda": MethodSpec(wanda, "required", "both", layerwise=True),
    "sparsegpt": MethodSpec(sparsegpt, "required", "kn", full_gram=True, layerwise=True),
    "sparsegpt-refit": MethodSpec(
        sparsegpt, "required", "kn", full_gram=True, layerwise=True, fixed={"refit": True}
    ),
    "cast": MethodSpec(
        cast,
        "required",
        "kn",
        group_gram=True,
        premask=True,
        full_gram="reconstruct",
        layerwise=True,
        spectra="premask",
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
        spectra="premask",
    ),
}
"""The method registry: every name :func:`knsparse.prune` and the CLI accept. Add to it with
:func:`register_method`."""


def register_method(
    name: str,
    *,
    calib: Literal["required", "optional", "unused"] = "unused",
    patterns: Literal["kn", "unstructured", "both"] = "both",
    replace: bool = False,
    **spec: object,
) -> Callable[[MethodFn], MethodFn]:
    """Decorator: register a mask method under ``name`` (timm's ``register_model`` for masks).

    The function takes ``(layers, pattern, sparsity, **options)`` — ``layers`` a
    ``{name: Layer}`` of reduction-view weights (:class:`~.base.Layer`), ``pattern`` a
    :class:`Pattern` or ``None``, its keyword-only parameters the options a recipe may set —
    and returns ``{name: Decision}``. ``calib``/``patterns`` and the other :class:`MethodSpec`
    fields (``group_gram``, ``premask``, ``full_gram``, ``layerwise``, ``fixed``, ``spectra``)
    say what it needs. A name already registered is a ``ValueError`` unless ``replace=True``::

        @ks.register_method("my-scores", calib="required", layerwise=True)
        def my_scores(layers, pattern, sparsity, *, alpha=0.5): ...
    """
    if not isinstance(name, str) or not name:
        raise TypeError(f"method name must be a non-empty str, got {name!r}")

    def register(fn: MethodFn) -> MethodFn:
        if not callable(fn):
            raise TypeError(f"register_method({name!r}) decorates a function, got {type(fn).__name__}")
        if name in METHODS and not replace:
            raise ValueError(f"method {name!r} is already registered (pass replace=True to override)")
        METHODS[name] = MethodSpec(fn, calib, patterns, **spec)
        return fn

    return register


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
    "register_method",
    "rmt",
    "select",
    "ser",
    "sparsegpt",
    "wanda",
    "yopo",
]
