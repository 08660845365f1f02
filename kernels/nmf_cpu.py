"""ctypes launcher of ``nmf_cpu.c``, the CPU twin of the Triton NMF kernel in :mod:`.nmf`."""

from __future__ import annotations

import ctypes
from concurrent.futures import ThreadPoolExecutor

import torch

from . import native

_ARGTYPES = [ctypes.c_void_p] * 4 + [ctypes.c_int64] * 5 + [ctypes.c_float]
_VEC = 16  # floats per vector in nmf_cpu.c; rows of H must be padded to a multiple of it


def _library(rank: int) -> ctypes.CDLL | None:
    lib = native.load("nmf_cpu.c", (("RANK", rank),))
    if lib is not None and not lib.knsparse_nmf_mu.argtypes:
        lib.knsparse_nmf_mu.argtypes = _ARGTYPES
        lib.knsparse_nmf_mu.restype = ctypes.c_int
    return lib


def native_available(rank: int = 7) -> bool:
    """True when ``nmf_cpu.c`` compiles (or is cached) for ``rank`` on this machine."""
    return _library(rank) is not None


def fit_native_(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, iters: int, eps: float
) -> bool:
    """Run the C kernel in place on contiguous CPU tensors ``x [B, mp, np]``, ``v [B, mp, r]``,
    ``h [B, r, np]``, int32 ``sizes [B, 2]``. Returns False, touching nothing, when the kernel is
    unavailable. Disjoint slices of the batch run on ``torch.get_num_threads()`` threads (ctypes
    releases the GIL), so threads never wait on each other inside an iteration.
    """
    b, mp, np_ = x.shape
    rank = v.shape[2]
    lib = _library(rank)
    if lib is None:
        return False
    ldh = -(-np_ // _VEC) * _VEC
    hp = h if ldh == np_ else torch.nn.functional.pad(h, (0, ldh - np_)).contiguous()
    threads = max(1, min(b, torch.get_num_threads()))
    bounds = [b * i // threads for i in range(threads + 1)]

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

    if threads == 1:
        codes = [run(0, b)]
    else:
        with ThreadPoolExecutor(threads) as pool:
            codes = list(pool.map(run, bounds[:-1], bounds[1:]))
    if any(codes):
        raise MemoryError("nmf_cpu.c could not allocate its scratch buffer")
    if hp is not h:
        h.copy_(hp[..., :np_])
    return True
