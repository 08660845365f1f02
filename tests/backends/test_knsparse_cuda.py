"""knsparse-cuda on CPU: the sparse GEMM reference twin, the backend's Linear/Conv lowering
(padding, im2col, 1x1 direct) run through the reference twin, argument errors and availability
reporting. The native library itself: tests/test_native.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from weights24 import packed, random_24

from knsparse.backends import ConvSpec, LinearSpec
from knsparse.backends import knsparse_cuda as kc
from knsparse.core.masks import nm_mask
from knsparse.core.pack import pack_24
from knsparse.core.pattern import Pattern
from knsparse.ops import gemm, native
from knsparse.ops.device import available, unavailable_reason
from knsparse.ops.meta import prepare_meta


@pytest.mark.parametrize("activation", gemm.ACTIVATIONS)
@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_gemm_ref_is_the_dense_linear(activation, arch, with_bias):
    dense = random_24(64, 128)
    p = pack_24(dense)
    values, meta = p.values, p.meta
    x = torch.randn(3, 5, 128)
    bias = torch.randn(64) if with_bias else None
    got = gemm.sparse_gemm_ref(values, prepare_meta(meta, arch=arch), x, bias, activation)
    linear = F.linear(x, dense.float(), bias)
    want = {"none": linear, "relu": F.relu(linear), "gelu": F.gelu(linear)}[activation]
    assert got.shape == (3, 5, 64)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5)


def test_float32_values_are_refused():
    values = torch.zeros(32, 32)
    with pytest.raises(TypeError, match="float16 or bfloat16"):
        gemm.sparse_gemm_ref(values, torch.zeros(32, 4, dtype=torch.int16), torch.randn(4, 64))


def test_sparse_gemm_ref_returns_the_input_dtype():
    values, meta = packed(32, 64, torch.bfloat16)
    x = torch.randn(4, 64, dtype=torch.bfloat16)
    assert gemm.sparse_gemm_ref(values, meta, x).dtype == torch.bfloat16


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
        gemm.sparse_gemm_ref(values, meta, x, bias, activation)
    with pytest.raises(ValueError, match=match):
        gemm.sparse_gemm(values, meta, x, bias, activation)


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the report of a machine without CUDA")
def test_unavailable_backend_says_why():
    reason = unavailable_reason()
    assert reason is not None and ("CUDA" in reason or "not built" in reason)
    assert not available() and kc.KNSPARSE_CUDA.unavailable_reason() == reason
    values, meta = packed(32, 64)
    with pytest.raises(RuntimeError, match="knsparse-cuda kernels unavailable: "):
        gemm.sparse_gemm(values, meta, torch.randn(4, 64, dtype=torch.float16))


def test_missing_library_is_reported_with_the_build_command(monkeypatch, tmp_path):
    monkeypatch.setenv(native.LIBRARY_ENV, str(tmp_path / "absent.so"))
    native._load.cache_clear()
    try:
        error = native.load_error()
        assert error.startswith(f"libknsparse_cuda.so not built (no {tmp_path / 'absent.so'})")
        assert "make cuda" in error and unavailable_reason() == error
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


def test_unloadable_library_is_reported(monkeypatch, tmp_path):
    broken = tmp_path / "libknsparse_cuda.so"
    broken.write_bytes(b"not an ELF file")
    monkeypatch.setenv(native.LIBRARY_ENV, str(broken))
    native._load.cache_clear()
    try:
        assert native.load_error().startswith(f"failed to load {broken}: ")
    finally:
        monkeypatch.undo()
        native._load.cache_clear()


# --- the registry backend, with the kernel replaced by its reference twin ------------------------


@pytest.fixture
def backend_on_reference(monkeypatch):
    """KNSPARSE_CUDA with sparse_gemm -> sparse_gemm_ref: checks the lowering on CPU."""
    monkeypatch.setattr(gemm, "sparse_gemm", gemm.sparse_gemm_ref)
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
    """A 3x3 conv pruned in (C,R,S) order: the backend says why it cannot run it, and a weight
    that reaches prepare_conv anyway is refused (its (R,S,C) groups are not 2:4), never packed."""
    crs = Pattern.parse("2:4/crs")
    weight = torch.randn(32, 8, 3, 3)
    weight = (weight * nm_mask(weight.abs(), crs)).half()
    assert not torch.equal(weight, weight * nm_mask(weight.abs(), "2:4"))  # not 2:4 in RSC order
    spec = ConvSpec(32, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float16, crs, torch.device("cpu"))
    assert "'rsc' order" in kc.KNSPARSE_CUDA.conv_unsupported_reason(spec)
    with pytest.raises(ValueError, match="not 2:4"):
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


# --- the custom ops' fake implementations (no kernel runs: shapes and strides only) -----------


def _traced_outputs(fn, *args):
    """The fake outputs of ``fn``'s graph, traced by torch.compile with fullgraph=True (a graph
    break would raise). The backend records them and stops: no kernel runs on CPU."""
    seen = []

    class Traced(Exception):
        pass

    def backend(gm, example_inputs):
        seen.extend(node.meta["example_value"] for node in gm.graph.output_node().args[0])
        raise Traced

    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.BackendCompilerFailed) as info:
        torch.compile(fn, fullgraph=True, backend=backend)(*args)
    assert isinstance(info.value.inner_exception, Traced)
    return seen


@pytest.mark.parametrize("arch", ["sm80", "sm90"])
@pytest.mark.parametrize("tokens", [197, 5, 1])
def test_sparse_gemm_fake_is_token_major_under_torch_compile(arch, tokens):
    values, meta = packed(96, 128)
    meta = prepare_meta(meta, arch=arch)
    x = torch.randn(2, tokens, 128, dtype=torch.float16)
    (out,) = _traced_outputs(lambda t: gemm.sparse_gemm(values, meta, t, None, "gelu"), x)
    assert tuple(out.shape) == (2, tokens, 96) and out.stride() == (tokens * 96, 96, 1)
    assert out.dtype == torch.float16


def test_im2col_fake_under_torch_compile():
    from knsparse.ops.im2col import im2col_rsc_cuda

    x = torch.randn(2, 8, 9, 11, dtype=torch.float16)
    with pytest.raises(RuntimeError, match="knsparse-cuda kernels unavailable"):
        im2col_rsc_cuda(x, 3, 2, 1, 1, 80)  # eager on CPU: refused with the reason
    (out,) = _traced_outputs(lambda t: im2col_rsc_cuda(t, 3, 2, 1, 1, 80), x)
    assert tuple(out.shape) == (2 * 5 * 6, 80) and out.stride() == (80, 1)


def test_sparse_gemm_fake_under_torch_export():
    values, meta = packed(64, 128)

    class Layer(torch.nn.Module):
        def forward(self, t):
            return gemm.sparse_gemm(values, meta, t, None, "relu")

    program = torch.export.export(Layer(), (torch.randn(9, 128, dtype=torch.float16),))
    (node,) = [n for n in program.graph.nodes if n.target is torch.ops.knsparse.sparse_gemm.default]
    assert tuple(node.meta["val"].shape) == (9, 64) and node.meta["val"].stride() == (64, 1)


@pytest.mark.parametrize(
    ("meta", "match"),
    [
        (torch.zeros(64, 8, dtype=torch.int32), "meta must be int16 \\(64, 8\\)"),
        (torch.zeros(64, 4, dtype=torch.int16), "got torch.int16 \\(64, 4\\)"),
        (torch.zeros(64, 8, dtype=torch.uint8), "uint8 \\(64, 16\\)"),
    ],
)
def test_sparse_gemm_refuses_metadata_of_another_shape(meta, match):
    values = torch.zeros(64, 64, dtype=torch.float16)
    with pytest.raises(ValueError, match=match):
        gemm.sparse_gemm(values, meta, torch.zeros(4, 128, dtype=torch.float16))
