"""ctypes binding of ``libknsparse_cuda.so``, the C ABI of ``csrc/knsparse_capi.h``.

The library holds knsparse's CUDA kernels (2:4 sparse GEMM for sm_80 and sm_90a, im2col),
links the CUDA runtime statically and nothing of PyTorch, so one build (``make cuda``, no GPU
needed) serves every torch version. This module finds and loads it, mirrors its argument
structs, and turns its status codes into exceptions; it never imports torch's CUDA side, so it
works (and reports cleanly) on machines without a GPU.

``KNSPARSE_CUDA_LIBRARY=/path/to/libknsparse_cuda.so`` overrides where it is looked for.
"""

from __future__ import annotations

import ctypes
import functools
import os
from dataclasses import dataclass
from pathlib import Path

LIBRARY_ENV = "KNSPARSE_CUDA_LIBRARY"
LIBRARY_NAME = "libknsparse_cuda.so"
ABI_VERSION = 1  # KNSPARSE_ABI_VERSION of the headers this binding mirrors
BUILD_HINT = (
    "build it with `make cuda` (nvcc from CUDA >= 12.2 and the nvidia-cutlass headers; no GPU needed)"
)

# knsparse_status
OK, INVALID_ARGUMENT, NO_DEVICE, UNSUPPORTED_ARCH, CUTLASS_ERROR, CUDA_ERROR = range(6)
DTYPE_CODES = {"float16": 0, "bfloat16": 1}
ACTIVATION_CODES = {"none": 0, "relu": 1, "gelu": 2}
CONFIG_CODES = {"auto": 0, "large": 1, "small": 2}
CONFIG_NAMES = {code: name for name, code in CONFIG_CODES.items()}
_MSG_LEN = 1024


class NativeError(RuntimeError):
    """A knsparse_cuda call failed; ``status`` is its knsparse_status code."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class NativeArgumentError(NativeError, ValueError):
    """The library refused the arguments (shape, stride, alignment, code): a ValueError too."""


class GemmArgs(ctypes.Structure):
    """Mirror of ``knsparse_gemm_args``."""

    _fields_ = [
        ("rows", ctypes.c_int64),
        ("cols", ctypes.c_int64),
        ("depth", ctypes.c_int64),
        ("values", ctypes.c_void_p),
        ("meta", ctypes.c_void_p),
        ("x", ctypes.c_void_p),
        ("ldx", ctypes.c_int64),
        ("bias", ctypes.c_void_p),
        ("out", ctypes.c_void_p),
        ("ldo", ctypes.c_int64),
        ("dtype", ctypes.c_int32),
        ("activation", ctypes.c_int32),
        ("config", ctypes.c_int32),
        ("reserved", ctypes.c_int32),
    ]


class Im2colArgs(ctypes.Structure):
    """Mirror of ``knsparse_im2col_args``."""

    _fields_ = [
        ("x", ctypes.c_void_p),
        *(
            (name, ctypes.c_int64)
            for name in ("n", "c", "h", "w", "stride_n", "stride_c", "stride_h", "stride_w")
        ),
        *(
            (name, ctypes.c_int64)
            for name in (
                "kernel_h",
                "kernel_w",
                "conv_stride_h",
                "conv_stride_w",
                "pad_h",
                "pad_w",
                "dil_h",
                "dil_w",
                "out_h",
                "out_w",
                "k_pad",
            )
        ),
        ("out", ctypes.c_void_p),
    ]


def library_path() -> Path:
    """Where the library is looked for: ``$KNSPARSE_CUDA_LIBRARY`` or next to this module."""
    explicit = os.environ.get(LIBRARY_ENV)
    return Path(explicit) if explicit else Path(__file__).resolve().parent / LIBRARY_NAME


def _declare(lib: ctypes.CDLL) -> None:
    c_int, c_size, ptr, msg = ctypes.c_int, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_char_p
    int_p = ctypes.POINTER(c_int)
    signatures = {
        "knsparse_abi_version": (c_int, []),
        "knsparse_gemm_args_size": (c_size, []),
        "knsparse_im2col_args_size": (c_size, []),
        "knsparse_build_info": (ctypes.c_char_p, []),
        "knsparse_device_info": (c_int, [c_int, int_p, int_p, int_p, msg, c_size]),
        "knsparse_sparse_gemm_check": (c_int, [ctypes.POINTER(GemmArgs), c_int, c_int, int_p, msg, c_size]),
        "knsparse_sparse_gemm_workspace": (
            c_int,
            [ctypes.POINTER(GemmArgs), c_int, c_int, ctypes.POINTER(c_size), msg, c_size],
        ),
        "knsparse_sparse_gemm": (
            c_int,
            [ctypes.POINTER(GemmArgs), c_int, ptr, c_size, c_int, ptr, msg, c_size],
        ),
        "knsparse_im2col_rsc": (c_int, [ctypes.POINTER(Im2colArgs), c_int, ptr, msg, c_size]),
    }
    for name, (restype, argtypes) in signatures.items():
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes


@functools.cache
def _load() -> tuple[ctypes.CDLL | None, str | None]:
    path = library_path()
    if not path.is_file():
        return None, f"{LIBRARY_NAME} not built (no {path}); {BUILD_HINT}"
    try:
        lib = ctypes.CDLL(str(path))
        _declare(lib)
    except (OSError, AttributeError) as exc:
        return None, f"failed to load {path}: {exc}"
    version = lib.knsparse_abi_version()
    if version != ABI_VERSION:
        return None, f"{path} has C ABI version {version}, this knsparse expects {ABI_VERSION}; rebuild it"
    sizes = (lib.knsparse_gemm_args_size(), lib.knsparse_im2col_args_size())
    if sizes != (ctypes.sizeof(GemmArgs), ctypes.sizeof(Im2colArgs)):
        return None, f"{path}: argument struct sizes {sizes} differ from the binding's; rebuild it"
    return lib, None


def load_error() -> str | None:
    """Why the library cannot be loaded, or None when it is loaded."""
    return _load()[1]


def library() -> ctypes.CDLL:
    """The loaded library; RuntimeError with the reason when there is none."""
    lib, error = _load()
    if lib is None:
        raise RuntimeError(error)
    return lib


def build_info() -> str:
    """The architectures and kernels this build holds."""
    return library().knsparse_build_info().decode()


def check(status: int, buffer: ctypes.Array) -> None:
    """Raise the exception for a failed call's ``status`` with its message."""
    if status == OK:
        return
    message = buffer.value.decode(errors="replace")
    raise (NativeArgumentError if status == INVALID_ARGUMENT else NativeError)(status, message)


def message_buffer() -> ctypes.Array:
    return ctypes.create_string_buffer(_MSG_LEN)


@dataclass(frozen=True)
class DeviceInfo:
    major: int
    minor: int
    sm_count: int


def device_info(device: int = 0) -> DeviceInfo:
    """Compute capability and SM count of CUDA device ``device`` as the library sees it;
    :class:`NativeError` (status ``NO_DEVICE``) without a driver or device."""
    major, minor, sms = ctypes.c_int(), ctypes.c_int(), ctypes.c_int()
    buffer = message_buffer()
    status = library().knsparse_device_info(
        device, ctypes.byref(major), ctypes.byref(minor), ctypes.byref(sms), buffer, _MSG_LEN
    )
    check(status, buffer)
    return DeviceInfo(major.value, minor.value, sms.value)


def gemm_check(args: GemmArgs, arch: int, sm_count: int) -> str:
    """Host-only check of a sparse GEMM (no device needed): the library's pre-checks and
    CUTLASS's ``can_implement`` on the kernel type it would run. Returns the configuration
    (``"large"`` / ``"small"``) or raises :class:`NativeError` naming the refused condition."""
    config = ctypes.c_int()
    buffer = message_buffer()
    check(
        library().knsparse_sparse_gemm_check(
            ctypes.byref(args), arch, sm_count, ctypes.byref(config), buffer, _MSG_LEN
        ),
        buffer,
    )
    return CONFIG_NAMES[config.value]


def gemm_workspace(args: GemmArgs, arch: int, device: int) -> int:
    """Bytes of workspace :func:`gemm` needs for ``args`` on ``device``."""
    size = ctypes.c_size_t()
    buffer = message_buffer()
    check(
        library().knsparse_sparse_gemm_workspace(
            ctypes.byref(args), arch, device, ctypes.byref(size), buffer, _MSG_LEN
        ),
        buffer,
    )
    return size.value


def run_gemm(
    args: GemmArgs, arch: int, workspace: int | None, workspace_bytes: int, device: int, stream: int
) -> None:
    """Launch the sparse GEMM (asynchronous, on ``stream``, a ``cudaStream_t`` as an int)."""
    buffer = message_buffer()
    status = library().knsparse_sparse_gemm(
        ctypes.byref(args), arch, workspace, workspace_bytes, device, stream, buffer, _MSG_LEN
    )
    check(status, buffer)


def run_im2col(args: Im2colArgs, device: int, stream: int) -> None:
    """Launch im2col (asynchronous, on ``stream``)."""
    buffer = message_buffer()
    check(library().knsparse_im2col_rsc(ctypes.byref(args), device, stream, buffer, _MSG_LEN), buffer)
