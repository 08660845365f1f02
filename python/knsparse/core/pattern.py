"""k:n sparsity patterns: parsing and validation.

A k:n pattern keeps ``k`` entries in every group of ``n`` consecutive entries along the
reduction (input) dimension of a weight. For a conv weight ``[Cout, Cin, R, S]`` the reduction
axis has two orders, and the pattern carries which one its groups follow (``conv_order``):

* ``"rsc"`` (default): ``n`` consecutive *input channels* at each kernel position ``(r, s)`` —
  TensorRT's rule for sparse convolutions and knsparse's im2col order;
* ``"crs"``: along ``weight.flatten(1)`` (what SparseGPT / ModelOpt do; not TensorRT-eligible for
  kernels larger than 1x1).

Linear weights have one order; the conv order does not change their groups. The text form is
``"2:4"`` (rsc) or ``"2:4/crs"``. Unstructured sparsity is not a pattern: it travels as a fraction
(``sparsity=0.5``) and only the entry points that can prune without a group constraint
(:func:`knsparse.prune`, the unstructured mask functions) take it.

Every public function that takes a pattern parses it once with :meth:`Pattern.parse`, at its
entry; everything below works on :class:`Pattern` objects and reads the conv order from them.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from typing import Literal

_KN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*(?:/\s*([a-z]+)\s*)?$")

ConvOrder = Literal["rsc", "crs"]
CONV_ORDERS: tuple[ConvOrder, ...] = ("rsc", "crs")
"""How conv weights are grouped (see the module docstring); the one list of them."""


def check_conv_order(conv_order: object) -> None:
    """``ValueError`` naming ``conv_order`` unless it is ``"rsc"`` or ``"crs"``."""
    if conv_order not in CONV_ORDERS:
        raise ValueError(f"conv_order must be 'rsc' or 'crs', got {conv_order!r}")


NOT_A_PATTERN = (
    "'unstructured' is not a k:n pattern: give unstructured sparsity as a fraction "
    "(sparsity=0.5, no pattern) where it is accepted; k:n masks, channel permutation and sparse "
    "kernels need a k:n pattern such as '2:4'"
)
"""The one message for every place that is handed ``"unstructured"`` where a k:n pattern is needed."""


@dataclass(frozen=True)
class Pattern:
    """A k:n sparsity pattern: ``k`` kept of every ``n``, integers with ``0 < k < n``, and how
    conv weights are grouped (``conv_order``, ``"rsc"`` or ``"crs"``)."""

    k: int
    n: int
    conv_order: ConvOrder = "rsc"

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.k, self.n)):
            raise TypeError(
                f"Pattern needs integers k and n, got k={self.k!r} ({type(self.k).__name__}), "
                f"n={self.n!r} ({type(self.n).__name__})"
            )
        if not 0 < self.k < self.n:
            raise ValueError(f"invalid sparsity pattern {self.k}:{self.n}: need 0 < k < n")
        check_conv_order(self.conv_order)

    @classmethod
    def parse(cls, spec: str | Pattern, conv_order: ConvOrder | None = None) -> Pattern:
        """Parse ``"k:n"`` or ``"k:n/order"`` (``"2:4"``, ``"8:16"``, ``"2:4/crs"``); a
        :class:`Pattern` passes through. ``conv_order``, when given, sets the conv order of a
        text without one, and must agree with a text or Pattern that has one.

        Raises ``TypeError`` for anything but a string or a Pattern, and ``ValueError`` quoting
        the input when it is not ``k:n`` with integers ``0 < k < n`` (:data:`NOT_A_PATTERN` for
        ``"unstructured"``), names an unknown conv order, or contradicts ``conv_order``.
        """
        if conv_order is not None:
            check_conv_order(conv_order)
        if isinstance(spec, Pattern):
            if conv_order is not None and conv_order != spec.conv_order:
                if spec.conv_order != "rsc":
                    raise ValueError(
                        f"conv_order {conv_order!r} contradicts pattern {spec} "
                        f"(conv order {spec.conv_order!r})"
                    )
                return replace(spec, conv_order=conv_order)
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"pattern must be a string like '2:4', got {type(spec).__name__}")
        if spec.strip().lower() == "unstructured":
            raise ValueError(NOT_A_PATTERN)
        match = _KN_RE.match(spec)
        if match is None:
            raise ValueError(
                f"invalid sparsity pattern {spec!r}: expected 'k:n' with integers 0 < k < n "
                "(e.g. '2:4', '8:16'), optionally with a conv order ('2:4/crs')"
            )
        k, n, order = int(match.group(1)), int(match.group(2)), match.group(3)
        if not 0 < k < n:
            raise ValueError(f"invalid sparsity pattern {spec!r}: need 0 < k < n, got k={k}, n={n}")
        if order is not None and order not in CONV_ORDERS:
            raise ValueError(f"invalid sparsity pattern {spec!r}: conv order must be 'rsc' or 'crs'")
        if order is not None and conv_order is not None and order != conv_order:
            raise ValueError(f"conv_order {conv_order!r} contradicts pattern {spec!r}")
        return cls(k, n, order or conv_order or "rsc")

    @property
    def kn(self) -> tuple[int, int]:
        """``(k, n)``: the group rule alone, whatever the conv order."""
        return (self.k, self.n)

    @property
    def is_24(self) -> bool:
        return self.kn == (2, 4)

    @property
    def density(self) -> float:
        """Fraction of weights kept, ``k / n``."""
        return self.k / self.n

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned, ``1 - k / n``."""
        return 1.0 - self.density

    def __str__(self) -> str:
        """``"k:n"``, with ``"/crs"`` when conv weights are grouped along ``weight.flatten(1)``;
        :meth:`parse` reads it back."""
        return f"{self.k}:{self.n}" + ("" if self.conv_order == "rsc" else f"/{self.conv_order}")
