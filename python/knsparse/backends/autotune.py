"""The micro-benchmark behind ``backend="auto"``: the fastest backend for a layer's shape, cached.

When more than one backend accepts a layer, each candidate runs the layer's shape (a random
k:n weight in the layer's dtype, on its device) on the same activations — ``rows`` of them for
a Linear (default 2048: ViT-B/16 at batch 10, 197 tokens each), a ``[8, Cin, 28, 28]`` image
batch for a Conv2d — and the lowest median time wins. Results are cached in the process and
in ``$KNSPARSE_CACHE/autotune.json`` (default ``~/.cache/knsparse``), keyed by device name,
torch version and the layer spec, so each shape is measured once per machine. Set
``KNSPARSE_AUTOTUNE=0`` to skip the measurement and use the documented order of
:mod:`knsparse.backends` instead.
"""

from __future__ import annotations

import json
import math
import os
import statistics
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from ..core.masks import nm_mask
from ..utils.cache import cache_dir
from ..utils.timing import seconds_per_call
from .base import Backend, ConvSpec, LinearSpec

Spec = LinearSpec | ConvSpec
# seconds one call of a backend takes on a layer spec
Timer = Callable[[Backend, Spec], float]

LINEAR_ROWS = 2048
CONV_INPUT_HW = (28, 28)
CONV_BATCH = 8
WARMUP = 3
REPEATS = 20

_memory: dict[str, dict[str, float]] = {}


def enabled() -> bool:
    """False when ``KNSPARSE_AUTOTUNE=0``: ``auto`` then follows the documented order."""
    return os.environ.get("KNSPARSE_AUTOTUNE", "1") != "0"


def cache_path() -> Path:
    return cache_dir() / "autotune.json"


def spec_key(spec: Spec) -> str:
    """One string per (device, torch version, layer spec); the cache's key."""
    device = spec.device
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        where = torch.cuda.get_device_name(index)
    else:
        where = device.type
    return f"{where} | torch {torch.__version__} | {spec}"


def _inputs(spec: Spec) -> tuple[torch.Tensor, torch.Tensor]:
    """A random dense-masked k:n weight of the layer's shape and matching activations."""
    g = torch.Generator().manual_seed(0)
    if isinstance(spec, LinearSpec):
        shape = (spec.out_features, spec.in_features)
        x = torch.randn(LINEAR_ROWS, spec.in_features, generator=g)
    else:
        shape = (spec.out_channels, spec.in_channels // spec.groups, *spec.kernel_size)
        x = torch.randn(CONV_BATCH, spec.in_channels, *CONV_INPUT_HW, generator=g)
    w = torch.randn(shape, generator=g)
    w = w * nm_mask(w.abs(), spec.pattern)
    return w.to(spec.device, spec.dtype), x.to(spec.device, spec.dtype)


def measure(backend: Backend, spec: Spec) -> float:
    """Median seconds of one call of ``backend`` on the layer's shape (CUDA events on CUDA)."""
    w, x = _inputs(spec)
    if isinstance(spec, LinearSpec):
        operand = backend.prepare_linear(w)

        def call() -> torch.Tensor:
            return backend.linear(x, operand, None)

    else:
        operand = backend.prepare_conv(w)

        def call() -> torch.Tensor:
            return backend.conv2d(x, operand, None, spec)

    for _ in range(WARMUP):
        call()
    return statistics.median(seconds_per_call(call, spec.device) for _ in range(REPEATS))


def _load_disk() -> dict[str, dict[str, float]]:
    try:
        data = json.loads(cache_path().read_text())
    except (OSError, ValueError):
        return {}  # no cache yet, or an unreadable one: measure again and rewrite it
    return data if isinstance(data, dict) else {}


def _save_disk(key: str, timings: dict[str, float]) -> None:
    data = _load_disk()
    data[key] = timings
    path = cache_path()
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(data, indent=1, sort_keys=True))
        tmp.replace(path)
    except OSError:
        pass  # a read-only cache directory only costs a re-measurement next time


def fastest(
    candidates: Sequence[Backend], spec: Spec, timer: Timer = measure
) -> tuple[Backend, dict[str, float]]:
    """The candidate with the lowest time for ``spec`` (measured by ``timer``) and ``{name: seconds}``.

    Cached timings are reused when they cover every candidate; otherwise all are measured and
    the cache updated. A candidate whose run raises ``RuntimeError`` gets ``inf``. Ties keep the
    earlier candidate. ``ValueError`` on no candidates, ``RuntimeError`` if every one fails.
    """
    if not candidates:
        raise ValueError(f"no backend to benchmark for {spec}")
    names = [b.name for b in candidates]
    key = spec_key(spec)
    timings = _memory.get(key) or _load_disk().get(key) or {}
    if not all(isinstance(timings.get(n), (int, float)) for n in names):
        timings = {b.name: _time_or_inf(timer, b, spec) for b in candidates}
        if all(math.isinf(t) for t in timings.values()):
            raise RuntimeError(f"every candidate backend failed on {spec}: {', '.join(names)}")
        _save_disk(key, timings)
    _memory[key] = timings
    best = min(candidates, key=lambda b: timings[b.name])
    return best, {n: timings[n] for n in names}


def _time_or_inf(timer: Timer, backend: Backend, spec: Spec) -> float:
    """A backend whose kernel fails on this shape (a launch or packing error the shape checks
    did not foresee) loses the race instead of failing the user's swap; its time is ``inf``."""
    try:
        return float(timer(backend, spec))
    except RuntimeError:
        return math.inf


def clear_memory() -> None:
    """Forget the in-process timings (the disk cache stays)."""
    _memory.clear()
