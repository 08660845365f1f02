"""k:n sparsity patterns: parsing and validation.

A k:n pattern keeps ``k`` entries in every group of ``n`` consecutive entries along the
reduction (input) dimension of a weight. ``"unstructured"`` means no group constraint.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_KN_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")


@dataclass(frozen=True)
class Pattern:
    """A sparsity pattern: ``k`` kept of every ``n`` (``k = n = 0`` for unstructured)."""

    k: int
    n: int

    def __post_init__(self) -> None:
        for arg, value in (("k", self.k), ("n", self.n)):
            if isinstance(value, bool) or not isinstance(value, int):
                raise TypeError(f"Pattern {arg} must be an int, got {type(value).__name__} {value!r}")
        if (self.k, self.n) != (0, 0) and not 0 < self.k < self.n:
            raise ValueError(f"Pattern(k={self.k}, n={self.n}): need integers 0 < k < n (e.g. Pattern(2, 4))")

    @classmethod
    def parse(cls, spec: str | Pattern) -> Pattern:
        """Parse ``"k:n"`` (e.g. ``"2:4"``, ``"8:16"``) or ``"unstructured"``.

        Raises ``ValueError`` quoting the input when it is not ``k:n`` with integers
        ``1 <= k < n`` and ``n >= 2``.
        """
        if isinstance(spec, Pattern):
            return spec
        if not isinstance(spec, str):
            raise TypeError(f"pattern must be a string like '2:4', got {type(spec).__name__}")
        if spec.strip().lower() == "unstructured":
            return UNSTRUCTURED
        match = _KN_RE.match(spec)
        if match is None:
            raise ValueError(
                f"invalid sparsity pattern {spec!r}: expected 'k:n' with integers k < n "
                "(e.g. '2:4', '8:16') or 'unstructured'"
            )
        k, n = int(match.group(1)), int(match.group(2))
        if n < 2 or k < 1 or k >= n:
            raise ValueError(
                f"invalid sparsity pattern {spec!r}: need 1 <= k < n and n >= 2, got k={k}, n={n}"
            )
        return cls(k, n)

    @property
    def is_unstructured(self) -> bool:
        return self.n == 0

    @property
    def is_24(self) -> bool:
        return (self.k, self.n) == (2, 4)

    @property
    def density(self) -> float:
        """Fraction of weights kept (``k / n``); undefined for unstructured."""
        if self.is_unstructured:
            raise ValueError("an unstructured pattern has no fixed density")
        return self.k / self.n

    @property
    def sparsity(self) -> float:
        return 1.0 - self.density

    def __str__(self) -> str:
        return "unstructured" if self.is_unstructured else f"{self.k}:{self.n}"


UNSTRUCTURED = Pattern(0, 0)
