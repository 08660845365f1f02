"""ctypes launchers of ``nmf_cpu.c``: the CPU twins of the Triton NMF kernel in :mod:`.nmf` and of the
residual reference in :mod:`.residual`."""

from __future__ import annotations

import contextlib
import ctypes
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from . import native

_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_float]
_RESIDUAL_ARGTYPES = [ctypes.c_void_p] * 5 + [ctypes.c_int64] * 4
_VEC = 16  # floats per vector in nmf_cpu.c; rows of H must be padded to a multiple of it
_local = threading.local()


@contextlib.contextmanager
def serial() -> Iterator[None]:
    """Within this block, calls from the current thread run the whole batch on that thread; for
    callers that already run several batches concurrently."""
    _local.serial = True
    try:
        yield
    finally:
        _local.serial = False


def _library(rank: int) -> ctypes.CDLL | None:
    lib = native.load("nmf_cpu.c", (("RANK", rank),))
    if lib is not None and not lib.knsparse_nmf_mu.argtypes:
        lib.knsparse_nmf_mu.argtypes = _ARGTYPES
        lib.knsparse_nmf_mu.restype = ctypes.c_int
        lib.knsparse_residual.argtypes = _RESIDUAL_ARGTYPES
        lib.knsparse_residual.restype = None
    return lib


def _threads(batch: int) -> int:
    return 1 if getattr(_local, "serial", False) else max(1, min(batch, torch.get_num_threads()))


def _split(batch: int, run: Callable[[int, int], int | None]) -> list[int | None]:
    """``run(lo, hi)`` on disjoint slices of the batch, one per thread (ctypes releases the GIL)."""
    threads = _threads(batch)
    if threads == 1:
        return [run(0, batch)]
    bounds = [batch * i // threads for i in range(threads + 1)]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(run, bounds[:-1], bounds[1:]))


def native_available(rank: int = 7) -> bool:
    """True when ``nmf_cpu.c`` compiles (or is cached) for ``rank`` on this machine."""
    return _library(rank) is not None


def fit_native_(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, iters: int, eps: float
) -> bool:
    """Run the C kernel in place on contiguous CPU tensors ``x [B, mp, np]``, ``v [B, mp, r]``,
    ``h [B, r, np]``, int32 ``sizes [B, 2]``. Returns False, touching nothing, when the kernel is
    unavailable. Disjoint slices of the batch run on ``torch.get_num_threads()`` threads (ctypes
    releases the GIL), so threads never wait on each other inside an iteration; inside
    :func:`serial`, on the calling thread only.
    """
    b, mp, np_ = x.shape
    rank = v.shape[2]
    lib = _library(rank)
    if lib is None:
        return False
    ldh = -(-np_ // _VEC) * _VEC
    hp = h if ldh == np_ else torch.nn.functional.pad(h, (0, ldh - np_)).contiguous()

    def run(lo: int, hi: int) -> int:
        return lib.knsparse_nmf_mu(
            x[lo:hi].data_ptr(),
            v[lo:hi].data_ptr(),
            hp[lo:hi].data_ptr(),
            sizes[lo:hi].data_ptr(),
            hi - lo,
            mp,
            np_,
            ldh,
            iters,
            eps,
        )

    if any(_split(b, run)):
        raise MemoryError("nmf_cpu.c could not allocate its scratch buffer")
    if hp is not h:
        h.copy_(hp[..., :np_])
    return True


def residual_native_(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, out: torch.Tensor
) -> bool:
    """``out = |x - v @ h|``, zero outside ``sizes``, by the C kernel on contiguous CPU tensors ``x`` and
    ``out [B, mp, np]`` (``out`` may be ``x``), ``v [B, mp, r]``, ``h [B, r, np]``, int32 ``sizes [B, 2]``.
    Returns False, touching nothing, when the kernel is unavailable. Threads as :func:`fit_native_`.
    """
    b, mp, np_ = x.shape
    lib = _library(v.shape[2])
    if lib is None:
        return False

    def run(lo: int, hi: int) -> None:
        lib.knsparse_residual(
            x[lo:hi].data_ptr(),
            v[lo:hi].data_ptr(),
            h[lo:hi].data_ptr(),
            out[lo:hi].data_ptr(),
            sizes[lo:hi].data_ptr(),
            hi - lo,
            mp,
            np_,
            np_,
        )

    _split(b, run)
    return True
