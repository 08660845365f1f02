"""knsparse-cuda on CPU: metadata layouts (Ampere against torch's oracle, Hopper against
CUTLASS's own layout object through a host probe), the sparse GEMM reference twin, argument
errors, availability reporting and the fake implementation's shape."""

from __future__ import annotations

import subprocess

import pytest
import torch
import torch.nn.functional as F
from knsparse.backends import knsparse_cuda as kc
from knsparse.masks import nm_mask
from native_probes import build_probe
from torch.sparse._semi_structured_conversions import sparse_semi_structured_from_dense_cutlass

SHAPES = [(32, 64), (64, 128), (96, 256), (128, 576), (160, 384)]


def random_24(rows: int, depth: int, dtype=torch.float16, seed: int = 0) -> torch.Tensor:
    """A dense 2:4 weight whose kept entries are all nonzero."""
    g = torch.Generator().manual_seed(seed)
    w = torch.rand(rows, depth, generator=g) + 0.5
    w = w * torch.where(torch.rand(rows, depth, generator=g) < 0.5, -1.0, 1.0)
    return (w * nm_mask(torch.rand(rows, depth, generator=g), "2:4")).to(dtype)


def decode_units(plain: torch.Tensor) -> torch.Tensor:
    """Row-major int16 metadata units -> the kept column of every (row, group, slot)."""
    bits = plain.to(torch.int32) & 0xFFFF
    codes = torch.stack([(bits >> (2 * i)) & 0b11 for i in range(8)], dim=-1)  # [rows, units, 8]
    rows, units = plain.shape
    slots = codes.reshape(rows, units * 4, 2)  # (idx0, idx1) of every group of 4
    return slots + 4 * torch.arange(units * 4).reshape(1, -1, 1)


@pytest.mark.parametrize(("rows", "depth"), SHAPES)
def test_sm80_positions_read_torch_cutlass_metadata(rows, depth):
    dense = random_24(rows, depth)
    _, meta = sparse_semi_structured_from_dense_cutlass(dense)
    plain = meta.reshape(-1)[kc._sm80_meta_positions(rows, depth // 16).reshape(-1)].reshape(rows, -1)
    kept = dense.ne(0).nonzero()[:, 1].reshape(rows, depth // 4, 2)
    assert torch.equal(decode_units(plain), kept)


def test_sm80_positions_are_a_permutation():
    pos = kc._sm80_meta_positions(96, 24).reshape(-1)
    assert torch.equal(pos.sort().values, torch.arange(96 * 24))


@pytest.fixture(scope="module")
def sm90_probe(tmp_path_factory):
    return build_probe("sm90_meta_layout_probe", tmp_path_factory.mktemp("probe"), needs_cutlass=True)


@pytest.mark.parametrize(("rows", "depth"), [*SHAPES, (64, 3072), (200, 128)])
def test_sm90_positions_match_cutlass_layout(sm90_probe, rows, depth):
    run = subprocess.run([str(sm90_probe), str(rows), str(depth)], capture_output=True, text=True, check=True)
    table = torch.tensor([[int(v) for v in line.split()] for line in run.stdout.splitlines()])
    cutlass = torch.full((rows, depth // 16), -1, dtype=torch.int64)
    cutlass[table[:, 0], table[:, 1]] = table[:, 2]
    assert torch.equal(kc._sm90_meta_positions(rows, depth // 16), cutlass)
    meta_rows, meta_bytes = kc.sm90_meta_shape(rows, depth)
    assert run.stderr.strip() == f"storage_int16={meta_rows * meta_bytes // 2}"


@pytest.mark.parametrize(("rows", "depth"), SHAPES)
def test_sm90_conversion_round_trips_and_pads_with_zeros(rows, depth):
    _, meta = sparse_semi_structured_from_dense_cutlass(random_24(rows, depth))
    hopper = kc.prepare_meta(meta, arch="sm90")
    assert hopper.dtype == torch.uint8
    assert tuple(hopper.shape) == kc.sm90_meta_shape(rows, depth)
    assert torch.equal(kc.sm80_meta_from_sm90(hopper, rows, depth), meta)
    used = torch.zeros(hopper.numel() // 2, dtype=torch.bool)
    used[kc._sm90_meta_positions(rows, depth // 16).reshape(-1)] = True
    assert used.sum() == rows * depth // 16  # one slot per unit, no collisions
    assert not hopper.view(torch.int16).reshape(-1)[~used].any()


def test_prepare_meta_keeps_the_ampere_layout():
    _, meta = sparse_semi_structured_from_dense_cutlass(random_24(32, 64))
    assert kc.prepare_meta(meta) is meta
    assert kc.prepare_meta(meta, arch="sm80") is meta


@pytest.mark.parametrize(
    ("meta", "arch", "error", "match"),
    [
        (torch.zeros(32, 4, dtype=torch.int32), "sm80", TypeError, "int16"),
        (torch.zeros(16, 4, dtype=torch.int16), "sm90", ValueError, "multiple of 32"),
        (torch.zeros(32, 4, dtype=torch.int16), "sm75", ValueError, "'sm80' or 'sm90'"),
    ],
)
def test_prepare_meta_rejects_bad_input(meta, arch, error, match):
    with pytest.raises(error, match=match):
        kc.prepare_meta(meta, arch=arch)


@pytest.mark.parametrize("activation", kc.ACTIVATIONS)
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_gemm_ref_is_the_dense_linear(activation, arch, with_bias):
    dense = random_24(64, 128)
    values, meta = sparse_semi_structured_from_dense_cutlass(dense)
    x = torch.randn(3, 5, 128)
    bias = torch.randn(64) if with_bias else None
    got = kc.sparse_gemm_ref(values, kc.prepare_meta(meta, arch=arch), x, bias, activation)
    linear = F.linear(x, dense.float(), bias)
    want = {"none": linear, "relu": F.relu(linear), "gelu": F.gelu(linear)}[activation]
    assert got.shape == (3, 5, 64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_float32_values_are_refused():
    values = torch.zeros(32, 32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        kc.sparse_gemm_ref(values, torch.zeros(32, 4, dtype=torch.int16), torch.randn(4, 64))


def test_sparse_gemm_ref_returns_the_input_dtype():
    values, meta = sparse_semi_structured_from_dense_cutlass(random_24(32, 64, dtype=torch.bfloat16))
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert kc.sparse_gemm_ref(values, meta, x).dtype == torch.bfloat16


@pytest.mark.parametrize(
    ("x", "bias", "activation", "match"),
    [
        (torch.randn(4, 64), None, "silu", "activation must be one of"),
        (torch.randn(4, 32), None, "none", "depth 64"),
        (torch.randn(4, 64), torch.randn(31), "none", r"bias must have shape \(32,\)"),
    ],
)
def test_sparse_gemm_rejects_bad_arguments(x, bias, activation, match):
    values, meta = sparse_semi_structured_from_dense_cutlass(random_24(32, 64))
    with pytest.raises(ValueError, match=match):
        kc.sparse_gemm_ref(values, meta, x, bias, activation)
    with pytest.raises(ValueError, match=match):
        kc.sparse_gemm(values, meta, x, bias, activation)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_unavailable_backend_says_why():
    reason = kc.unavailable_reason()
    assert reason is not None and "CUDA" in reason
    assert not kc.available()
    values, meta = sparse_semi_structured_from_dense_cutlass(random_24(32, 64))
    with pytest.raises(RuntimeError, match="knsparse-cuda backend unavailable: no CUDA device"):
        kc.sparse_gemm(values, meta, torch.randn(4, 64, dtype=torch.float16))


def test_missing_library_is_reported_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv(kc.LIBRARY_ENV, str(tmp_path / "absent.so"))
    kc._load_error.cache_clear()
    try:
        assert kc._load_error() == f"{kc.LIBRARY_ENV}={tmp_path / 'absent.so'} does not exist"
    finally:
        monkeypatch.undo()
        kc._load_error.cache_clear()


def test_unloadable_library_is_reported(monkeypatch, tmp_path):
    broken = tmp_path / "_knsparse_cuda.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setenv(kc.LIBRARY_ENV, str(broken))
    kc._load_error.cache_clear()
    try:
        assert kc._load_error().startswith(f"failed to load {broken}: ")
    finally:
        monkeypatch.undo()
        kc._load_error.cache_clear()


def test_padded_depth_per_architecture():
    assert [kc.padded_depth(d, "sm80") for d in (64, 147, 576, 3072)] == [64, 192, 576, 3072]
    assert [kc.padded_depth(d, "sm90") for d in (64, 147, 576, 3072)] == [64, 160, 576, 3072]
    with pytest.raises(ValueError, match="arch must be one of"):
        kc.padded_depth(64, "sm75")


def test_fake_output_matches_the_kernel_output_layout():
    values = torch.empty(96, 64, dtype=torch.float16, device="meta")
    x = torch.empty(197, 128, dtype=torch.float16, device="meta")
    out = kc.sparse_gemm_output_like(values, x)
    assert out.shape == (96, 197) and out.stride() == (200, 1)
