"""Arrays from other libraries at the ops boundary: CuPy, JAX, Numba, NumPy as torch tensors.

Every public function of :mod:`knsparse.ops` that takes tensors also takes any array exposing
``__dlpack__`` (CuPy, JAX, NumPy, ...) or ``__cuda_array_interface__`` (Numba, CuPy) and views
it as a torch tensor **without a copy** (``torch.from_dlpack`` / ``torch.as_tensor``); results
are torch tensors (``cupy.from_dlpack(out)`` / ``jax.dlpack.from_dlpack(out)`` view them back,
again without a copy). Streams: the DLPack exchange hands torch's current stream to the
producer, which orders its pending work before it; for the CUDA array interface, torch's current
stream waits for the interface's ``stream`` (version 3), so an array written on another stream
is complete before a kernel reads it either way.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

ArrayLike = Any
"""A torch tensor or an array exposing ``__dlpack__`` / ``__cuda_array_interface__``."""

ARRAY_KINDS = (
    "a torch.Tensor or an array exposing __dlpack__ or __cuda_array_interface__ (CuPy, JAX, Numba, NumPy)"
)


def _negative_stride(value: object) -> bool:
    """True when ``value`` declares a negative stride (NumPy / CuPy ``strides``, or the CUDA array
    interface's): torch tensors cannot view such an array, and ``torch.from_dlpack`` aborts the
    process on one instead of raising."""
    strides = getattr(value, "strides", None)
    interface = getattr(value, "__cuda_array_interface__", None)
    if strides is None and isinstance(interface, Mapping):
        strides = interface.get("strides")
    try:
        return any(int(s) < 0 for s in strides or ())
    except (TypeError, ValueError):
        return False


def to_torch(value: ArrayLike, name: str) -> torch.Tensor:
    """``value`` as a torch tensor sharing its memory (a torch tensor is returned as is).

    Args:
        value: a torch tensor, or an array exposing ``__dlpack__`` or ``__cuda_array_interface__``,
            on any device torch can address.
        name: the argument's name, for the error messages.

    Raises:
        TypeError: ``value`` is none of those, or its library cannot share it (e.g. a NumPy
            string array); the message names ``name``.
        ValueError: ``value`` has a negative stride (a reversed view), which torch cannot view.
    """
    if isinstance(value, torch.Tensor):
        return value
    dlpack = hasattr(value, "__dlpack__")
    if not dlpack and not hasattr(value, "__cuda_array_interface__"):
        raise TypeError(f"{name} must be {ARRAY_KINDS}, got {type(value).__name__}")
    if _negative_stride(value):
        raise ValueError(
            f"{name} has a negative stride (a reversed view), which a torch tensor cannot view "
            "without a copy: pass a contiguous copy (e.g. numpy.ascontiguousarray)"
        )
    try:
        tensor = torch.from_dlpack(value) if dlpack else torch.as_tensor(value)
    except (BufferError, RuntimeError, TypeError, ValueError) as exc:
        raise TypeError(f"{name} ({type(value).__name__}) cannot be shared with torch: {exc}") from exc
    if not dlpack:
        _wait_for_producer(value.__cuda_array_interface__, tensor.device)
    return tensor


def _wait_for_producer(interface: Mapping, device: torch.device) -> None:
    """Make torch's current stream on ``device`` wait for the stream a CUDA array interface
    (version 3) names as the one its data was written on; nothing when it names none."""
    stream = interface.get("stream")
    if device.type != "cuda" or not isinstance(stream, int) or stream == 0:
        return
    torch.cuda.current_stream(device).wait_stream(torch.cuda.ExternalStream(stream, device=device))


def to_torch_optional(value: ArrayLike | None, name: str) -> torch.Tensor | None:
    """:func:`to_torch` for an optional argument: None stays None."""
    return None if value is None else to_torch(value, name)
