"""Execution backends for sparse layers and the rule that picks one.

``reference`` (masked dense, any device), ``torch-cusparselt`` and ``torch-cutlass``
(PyTorch's semi-structured 2:4 kernels, CUDA, Linear only) and ``knsparse-cuda`` (this
project's CUTLASS 2:4 GEMM with im2col conv lowering, built from ``csrc/``).

``backend="auto"``: on CPU the reference. On CUDA, the sparse backends that are usable and
accept the layer are the candidates (convs go to knsparse-cuda, the only backend that lowers
them); with one candidate it runs, with several a cached micro-benchmark of the layer's shape
picks the fastest (:mod:`knsparse.backends.autotune`). With ``KNSPARSE_AUTOTUNE=0`` the rule is
the documented order cuSPARSELt, PyTorch-CUTLASS, knsparse-cuda (knsparse-cuda last until
``bench/bench_gemm.py`` has measured it on a GPU). On CUDA a layer no sparse backend executes
is not swapped.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import autotune
from .base import Backend, BackendUnavailableError, ConvSpec, LinearSpec
from .knsparse_cuda import KNSPARSE_CUDA
from .reference import ReferenceBackend
from .torch_semi import CUSPARSELT, CUTLASS

REFERENCE = ReferenceBackend()
_REGISTRY: dict[str, Backend] = {b.name: b for b in (REFERENCE, CUSPARSELT, CUTLASS, KNSPARSE_CUDA)}
_auto_order_cuda = ["torch-cusparselt", "torch-cutlass", "knsparse-cuda"]


@dataclass(frozen=True)
class BackendStatus:
    name: str
    available: bool
    reason: str

    def __str__(self) -> str:
        return f"{self.name}: {'available' if self.available else 'unavailable'} ({self.reason})"


def register_backend(
    backend: Backend | type[Backend], *, auto: bool = False, replace: bool = False
) -> Backend | type[Backend]:
    """Add an execution backend (an instance of a :class:`Backend` subclass, or the subclass,
    built with no arguments) under its ``name``: ``swap_modules(..., backend=name)``,
    ``load_sparse`` and the audit can then use it. ``auto=True`` also makes it a candidate of
    ``backend="auto"`` on CUDA (after the built-in ones; the micro-benchmark picks among them).
    A name already registered is a ``ValueError`` unless ``replace=True``. Usable as a class
    decorator (``@register_backend``); returns what it was given."""
    instance = backend() if isinstance(backend, type) and issubclass(backend, Backend) else backend
    if not isinstance(instance, Backend):
        raise TypeError(
            f"register_backend takes a knsparse Backend (or subclass), got {type(backend).__name__}"
        )
    name = instance.name
    if not isinstance(name, str) or not name or name == "auto":
        raise ValueError(f"a backend needs a name other than 'auto', got {name!r}")
    if name in _REGISTRY and not replace:
        raise ValueError(f"backend {name!r} is already registered (pass replace=True to override)")
    _REGISTRY[name] = instance
    if auto and name not in _auto_order_cuda:
        _auto_order_cuda.append(name)
    return backend


def names() -> list[str]:
    return list(_REGISTRY)


def get(name: str) -> Backend:
    if not isinstance(name, str):
        raise TypeError(f"backend name must be a str, got {type(name).__name__} {name!r}")
    if name not in _REGISTRY:
        raise ValueError(f"unknown backend {name!r}; known: {', '.join(_REGISTRY)} or 'auto'")
    return _REGISTRY[name]


def available() -> list[BackendStatus]:
    """Every known backend, whether it is usable on this machine, and why (not)."""
    statuses = []
    for b in _REGISTRY.values():
        reason = b.unavailable_reason()
        note = "masked dense math, no sparse speed-up" if b is REFERENCE else "ready"
        statuses.append(BackendStatus(b.name, reason is None, reason or note))
    return statuses


def _unsupported(backend: Backend, spec: LinearSpec | ConvSpec) -> str | None:
    if isinstance(spec, LinearSpec):
        return backend.linear_unsupported_reason(spec)
    return backend.conv_unsupported_reason(spec)


def resolve(requested: str, spec: LinearSpec | ConvSpec) -> tuple[Backend | None, str]:
    """The backend that will run a layer: ``(backend, why)``; ``(None, why)`` if ``auto`` finds none.

    An explicitly requested backend that is unavailable or rejects the layer raises
    :class:`BackendUnavailableError` with the reason.
    """
    if requested != "auto":
        backend = get(requested)
        reason = backend.unavailable_reason() or _unsupported(backend, spec)
        if reason:
            raise BackendUnavailableError(f"backend {requested!r} cannot run this layer: {reason}")
        return backend, "requested"
    if spec.device.type != "cuda":
        return REFERENCE, f"{spec.device.type} device: reference backend (no sparse tensor cores)"
    candidates, reasons = [], []
    for name in _auto_order_cuda:
        backend = _REGISTRY[name]
        reason = backend.unavailable_reason() or _unsupported(backend, spec)
        if reason is None:
            candidates.append(backend)
        else:
            reasons.append(f"{name}: {reason}")
    if not candidates:
        return None, "; ".join(reasons)
    if len(candidates) == 1 or not autotune.enabled():
        return candidates[0], "auto (documented order)"
    best, timings = autotune.fastest(candidates, spec)
    measured = ", ".join(f"{n} {1e6 * t:.1f} us" for n, t in timings.items())
    return best, f"auto (fastest by micro-benchmark: {measured})"


__all__ = [
    "REFERENCE",
    "Backend",
    "BackendStatus",
    "BackendUnavailableError",
    "ConvSpec",
    "LinearSpec",
    "available",
    "get",
    "names",
    "register_backend",
    "resolve",
]
