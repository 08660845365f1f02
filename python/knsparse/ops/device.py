"""Whether knsparse's CUDA kernels can run: library built and loaded, a CUDA device, an
architecture the library has kernels for."""

from __future__ import annotations

import torch

from .native import LIBRARY_NAME, NativeError, device_info, load_error


def unavailable_reason(device: torch.device | str | int | None = None) -> str | None:
    """Why the native kernels cannot run on ``device`` (default: the current CUDA device), or None.

    Says apart "not built", "built but no CUDA device" (asking the library itself, so a CPU
    machine with the library reports the driver's own reason) and "no kernels for this GPU".
    """
    error = load_error()
    if error is not None:
        return error
    if not torch.cuda.is_available():
        try:
            device_info(0)
        except NativeError as exc:
            return f"{LIBRARY_NAME} built and loaded, but {exc}"
        return f"{LIBRARY_NAME} built and loaded, but torch.cuda.is_available() is False"
    index = torch.device("cuda", torch.cuda.current_device()) if device is None else torch.device(device)
    if index.type != "cuda":
        return f"knsparse-cuda runs on CUDA devices, not {index}"
    major, minor = torch.cuda.get_device_capability(index)
    if major != 8 and (major, minor) != (9, 0):
        return (
            f"compute capability {major}.{minor} has no knsparse_cuda kernels "
            "(sm_80 kernels serve 8.x, sm_90a kernels serve 9.0)"
        )
    return None


def available(device: torch.device | str | int | None = None) -> bool:
    """True if the sparse GEMM and im2col kernels can run on ``device``."""
    return unavailable_reason(device) is None


def require_device(device: torch.device) -> None:
    """Raise RuntimeError naming the reason when the kernels cannot run on ``device``."""
    if torch.compiler.is_compiling():  # checked when the eager call or the trace's first run happened
        return
    reason = unavailable_reason(device)
    if reason is not None:
        raise RuntimeError(f"knsparse-cuda kernels unavailable: {reason}")
