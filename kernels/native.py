"""Build and load small C kernels at first use (like a JIT), cached on disk.

The CPU twins of some Triton kernels are plain C11 files next to this module. They are compiled
once per machine with the system C compiler (``$CC``, default ``cc``) and ``-O3 -march=native``,
and loaded with :mod:`ctypes`; no Python headers, no ninja, no build step at install time.

The cache key covers the source, the flags, the compiler (its executable) and the CPU's
instruction-set flags, so a cache directory shared between machines never hands a binary to a CPU
that cannot run it.
Set ``KNSPARSE_NATIVE=0`` to disable native kernels (callers then use the PyTorch reference),
and ``KNSPARSE_CACHE_DIR`` to move the cache (default ``~/.cache/knsparse``).
"""

from __future__ import annotations

import ctypes
import functools
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import warnings
from pathlib import Path

_FLAGS = ("-O3", "-march=native", "-std=c11", "-ffp-contract=fast", "-shared", "-fPIC")


def enabled() -> bool:
    """False when ``KNSPARSE_NATIVE=0``."""
    return os.environ.get("KNSPARSE_NATIVE", "1") != "0"


def cache_dir() -> Path:
    return Path(os.environ.get("KNSPARSE_CACHE_DIR", Path.home() / ".cache" / "knsparse")) / "native"


@functools.cache
def _machine_tag() -> str:
    """Compiler identity and CPU instruction-set flags, for the cache key. The compiler is identified
    by its resolved executable's path, size and modification time, which change when it is replaced
    (asking it for ``--version`` would cost every fresh process a subprocess)."""
    cc = os.environ.get("CC", "cc")
    exe = shutil.which(cc)
    try:
        real = os.path.realpath(exe) if exe else cc
        st = os.stat(real)
        version = f"{real}|{st.st_size}|{st.st_mtime_ns}"
    except OSError:
        version = "unavailable"
    cpu_flags = ""
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith(("flags", "Features")):
                cpu_flags = line
                break
    return f"{cc}|{version}|{platform.machine()}|{cpu_flags}"


def load(source: str, defines: tuple[tuple[str, int], ...] = ()) -> ctypes.CDLL | None:
    """Compile ``source`` (a file name next to this module) with ``-D`` ``defines`` and load it.

    Returns None when native kernels are disabled, or (after one warning) when the compiler
    fails; the caller then falls back to its PyTorch reference.
    """
    return _build_and_load(source, defines) if enabled() else None


@functools.cache
def _build_and_load(source: str, defines: tuple[tuple[str, int], ...]) -> ctypes.CDLL | None:
    src = Path(__file__).with_name(source)
    if not src.exists():
        warnings.warn(
            f"knsparse: {src} is not installed (package data missing); using the PyTorch reference",
            RuntimeWarning,
            stacklevel=4,
        )
        return None
    cc = os.environ.get("CC", "cc")
    flags = [*_FLAGS, *(f"-D{k}={v}" for k, v in defines)]
    key = hashlib.sha256("\0".join([src.read_text(), *flags, _machine_tag()]).encode()).hexdigest()[:24]
    target = cache_dir() / f"{src.stem}-{key}.so"
    if not target.exists():
        if shutil.which(cc) is None:
            warnings.warn(
                f"knsparse: no C compiler {cc!r} found; {source} runs on the slower PyTorch reference",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
        try:
            _compile(cc, flags, src, target)
        except (OSError, subprocess.CalledProcessError) as err:
            detail = err.stderr if isinstance(err, subprocess.CalledProcessError) else err
            warnings.warn(
                f"knsparse: building {source} failed, using the PyTorch reference:\n{detail}",
                RuntimeWarning,
                stacklevel=4,
            )
            return None
    return ctypes.CDLL(str(target))


def _compile(cc: str, flags: list[str], src: Path, target: Path) -> None:
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        out = Path(tmp) / target.name
        subprocess.run([cc, *flags, str(src), "-o", str(out)], capture_output=True, text=True, check=True)
        os.replace(out, target)  # atomic: concurrent builders never see a half-written file
