"""knsparse-cuda on CPU: the sparse GEMM reference twin, the backend's Linear/Conv lowering
(padding, im2col, 1x1 direct) run through the reference twin, argument errors, availability
reporting and the fake implementation's strides."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from weights24 import packed, random_24

from knsparse.backends import ConvSpec, LinearSpec
from knsparse.backends import knsparse_cuda as kc
from knsparse.masks import nm_mask
from knsparse.pack import pack_24
from knsparse.pattern import Pattern


@pytest.mark.parametrize("activation", kc.ACTIVATIONS)
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_gemm_ref_is_the_dense_linear(activation, arch, with_bias):
    dense = random_24(64, 128)
    p = pack_24(dense)
    values, meta = p.values, p.meta
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
    values, meta = packed(32, 64, torch.bfloat16)
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
    values, meta = packed(32, 64)
    with pytest.raises(ValueError, match=match):
        kc.sparse_gemm_ref(values, meta, x, bias, activation)
    with pytest.raises(ValueError, match=match):
        kc.sparse_gemm(values, meta, x, bias, activation)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_unavailable_backend_says_why():
    reason = kc.unavailable_reason()
    assert reason is not None and "CUDA" in reason
    assert not kc.available()
    values, meta = packed(32, 64)
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


def test_fake_output_matches_the_kernel_output_layout():
    values = torch.empty(96, 64, dtype=torch.float16, device="meta")
    x = torch.empty(197, 128, dtype=torch.float16, device="meta")
    out = kc.sparse_gemm_output_like(values, x)
    assert out.shape == (96, 197) and out.stride() == (200, 1)


# --- the registry backend, with the kernel replaced by its reference twin ------------------------


@pytest.fixture
def backend_on_reference(monkeypatch):
    """KNSPARSE_CUDA with sparse_gemm -> sparse_gemm_ref: checks the lowering on CPU."""
    monkeypatch.setattr(kc, "sparse_gemm", kc.sparse_gemm_ref)
    return kc.KNSPARSE_CUDA


@pytest.mark.parametrize(("out_f", "in_f"), [(64, 128), (20, 40), (96, 72)])
def test_backend_linear_pads_and_slices(backend_on_reference, out_f, in_f):
    w = random_24(out_f, in_f, seed=out_f)
    bias = torch.randn(out_f, dtype=torch.float16)
    x = torch.randn(7, in_f, dtype=torch.float16)
    operand = backend_on_reference.prepare_linear(w)
    assert (operand.rows, operand.depth) == (out_f, in_f)
    got = backend_on_reference.linear(x, operand, bias)
    want = F.linear(x.float(), w.float(), bias.float())
    assert got.shape == (7, out_f)
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


CONVS = [
    # (c_in, c_out, kernel, stride, padding, dilation)
    (8, 12, (3, 3), (1, 1), (1, 1), (1, 1)),
    (16, 32, (3, 3), (2, 2), (1, 1), (1, 1)),
    (64, 32, (1, 1), (1, 1), (0, 0), (1, 1)),  # the direct path: no im2col
    (16, 32, (1, 1), (1, 1), (0, 0), (1, 1)),  # 1x1 whose depth is padded: im2col path
    (8, 32, (3, 3), (1, 1), "same", (2, 2)),
    (12, 32, (5, 3), (2, 1), (2, 0), (1, 2)),
]


@pytest.mark.parametrize(("c_in", "c_out", "kernel", "stride", "padding", "dilation"), CONVS)
@pytest.mark.parametrize("channels_last", [False, True])
def test_backend_conv_matches_conv2d(
    backend_on_reference, c_in, c_out, kernel, stride, padding, dilation, channels_last
):
    g = torch.Generator().manual_seed(c_in + c_out)
    weight = torch.randn(c_out, c_in, *kernel, generator=g)
    weight = (weight * nm_mask(weight.abs(), "2:4")).half()
    bias = torch.randn(c_out, generator=g).half()
    x = torch.randn(2, c_in, 9, 10, generator=g).half()
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    spec = ConvSpec(c_out, c_in, kernel, stride, padding, dilation, 1, torch.float16, Pattern(2, 4), x.device)
    operand = backend_on_reference.prepare_conv(weight)
    assert operand.depth == c_in * kernel[0] * kernel[1]
    got = backend_on_reference.conv2d(x, operand, bias, spec)
    want = F.conv2d(x.float(), weight.float(), bias.float(), stride, padding, dilation)
    assert got.shape == want.shape
    torch.testing.assert_close(got.float(), want, rtol=2e-3, atol=2e-3)


def test_backend_refuses_crs_grouped_conv_weights():
    weight = torch.randn(32, 8, 3, 3)
    weight = (weight * nm_mask(weight.abs(), "2:4", conv_order="crs")).half()
    assert not torch.equal(weight, weight * nm_mask(weight.abs(), "2:4"))  # not 2:4 in RSC order
    with pytest.raises(ValueError, match="conv_order='rsc'"):
        kc.KNSPARSE_CUDA.prepare_conv(weight)


def test_backend_reports_what_it_cannot_run():
    cpu = torch.device("cpu")
    b = kc.KNSPARSE_CUDA
    assert "2:4 only" in b.linear_unsupported_reason(LinearSpec(64, 64, torch.float16, Pattern(4, 8), cpu))
    assert "float16/bfloat16" in b.linear_unsupported_reason(
        LinearSpec(64, 64, torch.float32, Pattern(2, 4), cpu)
    )
    assert "not CUDA" in b.linear_unsupported_reason(LinearSpec(64, 64, torch.float16, Pattern(2, 4), cpu))
    grouped = ConvSpec(64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 2, torch.float16, Pattern(2, 4), cpu)
    assert "groups=2" in b.conv_unsupported_reason(grouped)
    same_even = ConvSpec(64, 64, (2, 2), (1, 1), "same", (1, 1), 1, torch.float16, Pattern(2, 4), cpu)
    assert "asymmetrically" in b.conv_unsupported_reason(same_even)
    assert b.name == "knsparse-cuda"
