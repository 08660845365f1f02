"""k:n sparsity patterns: parsing and validation.

A k:n pattern keeps ``k`` entries in every group of ``n`` consecutive entries along the
reduction (input) dimension of a weight. Unstructured sparsity is not a pattern: it travels as
a fraction (``sparsity=0.5``) and only the entry points that can prune without a group
constraint (:func:`knsparse.prune`, the unstructured mask functions) take it.

Every public function that takes a pattern parses it once with :meth:`Pattern.parse`, at its
entry; everything below works on :class:`Pattern` objects.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_KN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")

NOT_A_PATTERN = (
    "'unstructured' is not a k:n pattern: give unstructured sparsity as a fraction "
    "(sparsity=0.5, no pattern) where it is accepted; k:n masks, channel permutation and sparse "
    "kernels need a k:n pattern such as '2:4'"
)
"""The one message for every place that is handed ``"unstructured"`` where a k:n pattern is needed."""


@dataclass(frozen=True)
class Pattern:
    """A k:n sparsity pattern: ``k`` kept of every ``n``, integers with ``0 < k < n``."""

    k: int
    n: int

    def __post_init__(self) -> None:
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in (self.k, self.n)):
            raise TypeError(
                f"Pattern needs integers k and n, got k={self.k!r} ({type(self.k).__name__}), "
                f"n={self.n!r} ({type(self.n).__name__})"
            )
        if not 0 < self.k < self.n:
            raise ValueError(f"invalid sparsity pattern {self.k}:{self.n}: need 0 < k < n")

    @classmethod
    def parse(cls, spec: str | Pattern) -> Pattern:
        """Parse ``"k:n"`` (e.g. ``"2:4"``, ``"8:16"``); a :class:`Pattern` passes through.

        Raises ``TypeError`` for anything but a string or a Pattern, and ``ValueError`` quoting
        the input when it is not ``k:n`` with integers ``0 < k < n`` (:data:`NOT_A_PATTERN` for
        ``"unstructured"``).
        """
        if isinstance(spec, Pattern):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"pattern must be a string like '2:4', got {type(spec).__name__}")
        if spec.strip().lower() == "unstructured":
            raise ValueError(NOT_A_PATTERN)
        match = _KN_RE.match(spec)
        if match is None:
            raise ValueError(
                f"invalid sparsity pattern {spec!r}: expected 'k:n' with integers 0 < k < n "
                "(e.g. '2:4', '8:16')"
            )
        k, n = int(match.group(1)), int(match.group(2))
        if not 0 < k < n:
            raise ValueError(f"invalid sparsity pattern {spec!r}: need 0 < k < n, got k={k}, n={n}")
        return cls(k, n)

    @property
    def is_24(self) -> bool:
        return (self.k, self.n) == (2, 4)

    @property
    def density(self) -> float:
        """Fraction of weights kept, ``k / n``."""
        return self.k / self.n

    @property
    def sparsity(self) -> float:
        """Fraction of weights pruned, ``1 - k / n``."""
        return 1.0 - self.density

    def __str__(self) -> str:
        return f"{self.k}:{self.n}"
