"""libknsparse_cuda.so on a machine without a GPU: it loads through ctypes, its argument structs
match the binding, a call without a device returns a clean error naming the reason, and its
host-only check (the library's pre-checks + CUTLASS's own ``can_implement`` on the project's
kernel types) accepts every shape the benchmarks and the audit use and names what it refuses.

Skipped when the library is not built; CI builds it (``make cuda``) and sets
KNSPARSE_REQUIRE_NATIVE=1, which turns that skip into a failure.
"""

from __future__ import annotations

import ctypes
import os

import pytest
import torch
from gemm_shapes import all_shapes, resnet50, vit_b16

from knsparse import backends
from knsparse.ops import native

H200_SMS = 132


@pytest.fixture(scope="module", autouse=True)
def _library():
    error = native.load_error()
    if error is not None:
        if os.environ.get("KNSPARSE_REQUIRE_NATIVE") == "1":
            pytest.fail(f"KNSPARSE_REQUIRE_NATIVE=1 but {error}")
        pytest.skip(error)


def gemm_args(rows: int, depth: int, cols: int, arch: int, config: str = "auto", **fields) -> native.GemmArgs:
    """Arguments as knsparse.ops.gemm builds them (NULL pointers: checks only)."""
    ldo = rows if arch == 90 else cols
    base = dict(rows=rows, cols=cols, depth=depth, ldx=depth, ldo=ldo, dtype=0, activation=0)
    base["config"] = native.CONFIG_CODES[config]
    base.update(fields)
    return native.GemmArgs(**base)


def test_library_loads_and_matches_the_binding():
    lib = native.library()
    assert lib.knsparse_abi_version() == native.ABI_VERSION
    assert lib.knsparse_gemm_args_size() == ctypes.sizeof(native.GemmArgs)
    assert lib.knsparse_im2col_args_size() == ctypes.sizeof(native.Im2colArgs)
    assert "sm_90a" in native.build_info() and "compute_80" in native.build_info()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without a CUDA device")
def test_calls_without_a_device_fail_cleanly():
    with pytest.raises(native.NativeError, match="no CUDA device") as info:
        native.device_info(0)
    assert info.value.status == native.NO_DEVICE
    # Device pointers that were never allocated: the library must stop at the device check.
    args = gemm_args(64, 128, 8, 90, values=16, meta=32, x=48, out=64)
    with pytest.raises(native.NativeError, match="no CUDA device") as info:
        native.run_gemm(args, 90, None, 0, 0, 0)
    assert info.value.status == native.NO_DEVICE
    im2col = native.Im2colArgs(
        x=16, n=1, c=8, h=4, w=4, kernel_h=1, kernel_w=1, out_h=4, out_w=4, k_pad=8, out=32
    )
    with pytest.raises(native.NativeError, match="no CUDA device"):
        native.run_im2col(im2col, 0, 0)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_backends_report_built_but_no_device():
    status = {s.name: s for s in backends.available()}["knsparse-cuda"]
    assert not status.available
    assert status.reason.startswith("libknsparse_cuda.so built and loaded, but no CUDA device")


@pytest.mark.parametrize(("arch", "config"), [(80, "auto"), (90, "large"), (90, "small"), (90, "auto")])
@pytest.mark.parametrize("dtype", [0, 1])
def test_cutlass_accepts_every_benchmark_and_audit_shape(arch, config, dtype):
    refused = []
    for layer, rows, depth, tokens in all_shapes():
        cols = (tokens + 7) // 8 * 8 if arch == 80 else tokens  # the op pads x for Ampere
        for activation in (0, 1, 2):
            args = gemm_args(rows, depth, cols, arch, config, dtype=dtype, activation=activation)
            try:
                native.gemm_check(args, arch, H200_SMS)
            except native.NativeError as exc:
                refused.append(f"{layer} rows={rows} depth={depth} tokens={tokens} act={activation}: {exc}")
    assert refused == [], f"{len(refused)} refused, e.g. {refused[:5]}"


def test_small_problems_get_the_small_tile():
    proj_b1 = next(s for s in vit_b16(1) if s[0] == "attn.proj")
    fc1_b64 = next(s for s in vit_b16(64) if s[0] == "mlp.fc1")
    conv_b1 = next(s for s in resnet50(1) if s[0] == "layer1.0.conv2")
    assert native.gemm_check(gemm_args(*proj_b1[1:], 90), 90, H200_SMS) == "small"  # 12 large tiles
    assert native.gemm_check(gemm_args(*conv_b1[1:], 90), 90, H200_SMS) == "small"  # 64 rows
    assert native.gemm_check(gemm_args(*fc1_b64[1:], 90), 90, H200_SMS) == "large"  # 24 x 99 tiles
    assert native.gemm_check(gemm_args(*proj_b1[1:], 90, "large"), 90, H200_SMS) == "large"


@pytest.mark.parametrize(
    ("arch", "fields", "match"),
    [
        (90, {"rows": 100}, "rows=100 is not a multiple of 8"),
        (90, {"depth": 120, "ldx": 120}, "depth=120 is not a multiple of 16"),
        (90, {"ldx": 64}, "ldx=64 < depth=128"),
        (90, {"ldx": 132}, "ldx=132 is not a multiple of 8"),
        (90, {"ldo": 32}, "ldo=32 < rows=64"),
        (90, {"values": 8}, "values is not 16-byte aligned"),
        (90, {"x": 4}, "x is not 16-byte aligned"),
        (90, {"bias": 2}, "bias is not 16-byte aligned"),
        (90, {"activation": 7}, "activation code 7"),
        (90, {"dtype": 3}, "dtype code 3"),
        (90, {"config": 9}, "config code 9"),
        (80, {"cols": 197, "ldo": 200}, "cols=197 is not a multiple of 8"),
        (80, {"rows": 48, "ldo": 8}, "rows=48 is not a multiple of 32"),
        (80, {"depth": 96, "ldx": 96}, "depth=96 is not a multiple of 64"),
        (75, {}, "arch must be 80 or 90"),
    ],
)
def test_refusals_name_the_condition(arch, fields, match):
    args = gemm_args(64, 128, 8, arch if arch in (80, 90) else 90)
    for name, value in fields.items():
        setattr(args, name, value)
    with pytest.raises(native.NativeArgumentError, match=match) as info:
        native.gemm_check(args, arch, H200_SMS)
    assert isinstance(info.value, ValueError) and info.value.status == native.INVALID_ARGUMENT
