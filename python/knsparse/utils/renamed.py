"""Keyword arguments that were renamed: the old name still works, with a DeprecationWarning.

knsparse names the same thing the same way everywhere (``plan`` for a
:class:`~knsparse.core.plan.SparsityPlan` or mask dict, ``backend`` for a backend name); the
names some functions used before (``masks=``, ``backends=``) go through :func:`renamed`.
"""

from __future__ import annotations

import functools
import warnings
from collections.abc import Callable
from typing import TypeVar

F = TypeVar("F", bound=Callable[..., object])


def renamed(**old_to_new: str) -> Callable[[F], F]:
    """Decorator: ``old=value`` is passed on as ``new=value`` with a ``DeprecationWarning``;
    giving both is a ``TypeError`` naming them."""

    def wrap(fn: F) -> F:
        @functools.wraps(fn)
        def call(*args: object, **kwargs: object) -> object:
            for old, new in old_to_new.items():
                if old in kwargs:
                    if new in kwargs:
                        raise TypeError(f"{fn.__name__}() got both {old!r} and {new!r}; pass {new!r}")
                    warnings.warn(
                        f"{fn.__name__}({old}=...) is now {fn.__name__}({new}=...)",
                        DeprecationWarning,
                        stacklevel=2,
                    )
                    kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call  # type: ignore[return-value]

    return wrap
