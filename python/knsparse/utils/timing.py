"""The one way knsparse times a call: seconds per call of a no-argument function on a device.

On CUDA, events around ``inner`` back-to-back calls (the GPU's own clock; the host waits only
at the end); on the CPU, ``time.perf_counter`` around them. Callers take medians over repeats.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import torch


def seconds_per_call(fn: Callable[[], object], device: torch.device, inner: int = 1) -> float:
    """Mean wall-clock seconds of one call of ``fn`` over ``inner`` consecutive calls on ``device``."""
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(inner):
            fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3 / inner
    t0 = time.perf_counter()
    for _ in range(inner):
        fn()
    return (time.perf_counter() - t0) / inner
