"""Sparse backends on a GPU against the fp32 reference under the 2x-of-PyTorch-error rule, for
Linear and Conv, fp16 and bf16: every registered backend plus knsparse-cuda through the
Backend interface; knsparse-cuda's fused epilogue (bias, ReLU, GELU) and odd shapes through
``sparse_gemm``; the im2col kernel bit-exact; the custom ops traced by torch.compile and
checked by torch.library.opcheck.

Skipped without CUDA (conftest). A backend that cannot run here is skipped with its reason;
KNSPARSE_REQUIRE_CUDA_BACKEND=1 (GPU sessions) turns a missing knsparse-cuda into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from knsparse import backends
from knsparse.backends import ConvSpec, LinearSpec
from knsparse.backends import knsparse_cuda as kc
from knsparse.backends.cutlass_meta import meta_arch, round_up
from knsparse.im2col import conv_output_size, im2col_rsc, im2col_rsc_ref, rows_to_nchw
from knsparse.masks import nm_mask, to_reduction_view
from knsparse.pack import pack_24
from knsparse.pattern import Pattern

pytestmark = pytest.mark.gpu

DTYPES = [torch.float16, torch.bfloat16]
ACT = {"none": lambda t: t, "relu": F.relu, "gelu": F.gelu}


# Every registered backend, and knsparse-cuda whether or not the registry lists it yet.
BACKENDS = {b.name: b for b in [*map(backends.get, backends.names()), kc.KNSPARSE_CUDA]}


def skip_unless_usable(reason: str | None, name: str) -> None:
    if reason is None:
        return
    if name == kc.KNSPARSE_CUDA.name and os.environ.get("KNSPARSE_REQUIRE_CUDA_BACKEND") == "1":
        pytest.fail(f"knsparse-cuda required but unavailable: {reason}")
    pytest.skip(f"{name}: {reason}")


@pytest.fixture
def cuda_backend():
    """For the tests that call knsparse-cuda's functions directly."""
    skip_unless_usable(kc.unavailable_reason(), kc.KNSPARSE_CUDA.name)


def assert_within_2x_of_torch(out: torch.Tensor, ref32: torch.Tensor, torch_lowp: torch.Tensor, what: str):
    """The flash-attention rule: at most twice PyTorch's own low-precision error (plus a hair
    for the case where PyTorch happens to be exact)."""
    assert out.shape == ref32.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref32.shape)}"
    err = (out.float() - ref32).abs().max().item()
    torch_err = (torch_lowp.float() - ref32).abs().max().item()
    assert err <= 2 * torch_err + 1e-5, f"{what}: max error {err:.3e} > 2 x PyTorch's {torch_err:.3e}"


def masked_weight(rows: int, depth: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, depth, generator=g) / depth**0.5
    return (w * nm_mask(w.abs(), "2:4")).to(dtype)


def pack(w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """values + metadata as knsparse.pack writes them, prepared for this GPU."""
    p = pack_24(w.cuda())
    return p.values, kc.prepare_meta(p.meta)


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("out_f", "in_f", "tokens"), [(3072, 768, 197 * 4), (768, 3072, 197), (96, 64, 8)])
def test_every_backend_linear_within_2x_of_torch(name, dtype, out_f, in_f, tokens):
    backend = BACKENDS[name]
    spec = LinearSpec(out_f, in_f, dtype, Pattern(2, 4), torch.device("cuda"))
    skip_unless_usable(backend.unavailable_reason() or backend.linear_unsupported_reason(spec), name)
    w = masked_weight(out_f, in_f, dtype, seed=out_f).cuda()
    bias = torch.randn(out_f, device="cuda", dtype=dtype)
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    out = backend.linear(x, backend.prepare_linear(w), bias)
    ref32 = F.linear(x.float(), w.float(), bias.float())
    assert_within_2x_of_torch(out, ref32, F.linear(x, w, bias), f"{name} linear {out_f}x{in_f} {dtype}")


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("activation", ["relu", "gelu"])
def test_every_backend_linear_activation_within_2x_of_torch(name, activation):
    """The activation a swapped fc1 carries after ``fuse_activations``: fused by knsparse-cuda,
    applied after the GEMM by the others."""
    dtype, out_f, in_f, tokens = torch.float16, 3072, 768, 197 * 2
    backend = BACKENDS[name]
    spec = LinearSpec(out_f, in_f, dtype, Pattern(2, 4), torch.device("cuda"))
    skip_unless_usable(backend.unavailable_reason() or backend.linear_unsupported_reason(spec), name)
    w = masked_weight(out_f, in_f, dtype, seed=1).cuda()
    bias = torch.randn(out_f, device="cuda", dtype=dtype)
    x = torch.randn(tokens, in_f, device="cuda", dtype=dtype)
    act = F.relu if activation == "relu" else F.gelu
    out = backend.linear(x, backend.prepare_linear(w), bias, activation)
    ref32 = act(F.linear(x.float(), w.float(), bias.float()))
    assert_within_2x_of_torch(out, ref32, act(F.linear(x, w, bias)), f"{name} linear+{activation}")


@pytest.mark.parametrize("name", list(BACKENDS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    ("c_in", "c_out", "kernel", "stride", "padding", "size"),
    [
        (64, 64, (3, 3), (1, 1), (1, 1), 28),
        (128, 128, (3, 3), (2, 2), (1, 1), 28),
        (256, 64, (1, 1), (1, 1), (0, 0), 14),
    ],
)
def test_every_backend_conv_within_2x_of_torch(name, dtype, c_in, c_out, kernel, stride, padding, size):
    backend = BACKENDS[name]
    spec = ConvSpec(
        c_out, c_in, kernel, stride, padding, (1, 1), 1, dtype, Pattern(2, 4), torch.device("cuda")
    )
    skip_unless_usable(backend.unavailable_reason() or backend.conv_unsupported_reason(spec), name)
    g = torch.Generator().manual_seed(c_in + c_out)
    weight = torch.randn(c_out, c_in, *kernel, generator=g) / (c_in * kernel[0] * kernel[1]) ** 0.5
    weight = (weight * nm_mask(weight.abs(), "2:4")).to(dtype).cuda()
    bias = torch.randn(c_out, device="cuda", dtype=dtype)
    x = torch.randn(4, c_in, size, size, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    out = backend.conv2d(x, backend.prepare_conv(weight), bias, spec)
    ref32 = F.conv2d(x.float(), weight.float(), bias.float(), stride, padding)
    torch_lowp = F.conv2d(x, weight, bias, stride, padding)
    assert_within_2x_of_torch(
        out, ref32, torch_lowp, f"{name} conv {c_in}->{c_out} k{kernel} s{stride} {dtype}"
    )


# (rows = out features, depth = in features, tokens): ViT-B/16 shapes at batch 1 and 2, odd
# token counts (the padded-column path), rows that are not a multiple of 64 (sm90 meta padding).
LINEAR_SHAPES = [
    (2304, 768, 197),
    (768, 768, 394),
    (3072, 768, 64),
    (768, 3072, 200),
    (96, 128, 5),
    (64, 64, 1),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "depth", "tokens"), LINEAR_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_sparse_linear_within_2x_of_torch(cuda_backend, dtype, rows, depth, tokens, activation, with_bias):
    w = masked_weight(rows, depth, dtype, seed=rows + depth)
    values, meta = pack(w)
    x = torch.randn(tokens, depth, device="cuda", dtype=dtype)
    bias = torch.randn(rows, device="cuda", dtype=dtype) if with_bias else None
    out = kc.sparse_gemm(values, meta, x, bias, activation)
    act = ACT[activation]
    wc = w.cuda()
    ref32 = act(F.linear(x.float(), wc.float(), None if bias is None else bias.float()))
    torch_lowp = act(F.linear(x, wc, bias))
    assert_within_2x_of_torch(
        out, ref32, torch_lowp, f"linear {rows}x{depth} tokens={tokens} {dtype} {activation}"
    )


def test_output_is_a_feature_major_view(cuda_backend):
    values, meta = pack(masked_weight(256, 128, torch.float16, 0))
    x = torch.randn(3, 67, 128, device="cuda", dtype=torch.float16)
    out = kc.sparse_gemm(values, meta, x)
    assert out.shape == (3, 67, 256)
    assert out.reshape(-1, 256).t().stride() == (round_up(3 * 67, kc.COLUMN_ALIGN), 1)


def test_strided_and_misaligned_activations(cuda_backend):
    w = masked_weight(128, 256, torch.float16, 1)
    values, meta = pack(w)
    wide = torch.randn(50, 264, device="cuda", dtype=torch.float16)
    flat = torch.randn(50 * 256 + 1, device="cuda", dtype=torch.float16)
    for x in (wide[:, :256], flat[1:].view(50, 256)):
        want = kc.sparse_gemm_ref(values, meta, x)
        torch.testing.assert_close(kc.sparse_gemm(values, meta, x), want, rtol=1e-2, atol=1e-2)


def test_wrong_metadata_layout_is_refused(cuda_backend):
    meta = pack_24(masked_weight(64, 128, torch.float16, 2)).meta.cuda()
    values = torch.zeros(64, 64, device="cuda", dtype=torch.float16)
    other = "sm80" if meta_arch("cuda") == "sm90" else "sm90"
    wrong = kc.prepare_meta(meta, arch=other)
    x = torch.randn(8, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="meta must be"):
        kc.sparse_gemm(values, wrong, x)


# ResNet-50 convolution shapes (batch 2): (c_in, c_out, kernel, stride, padding, spatial)
CONV_SHAPES = [
    (64, 64, 3, 1, 1, 56),
    (128, 128, 3, 2, 1, 56),
    (256, 256, 3, 1, 1, 14),
    (64, 256, 1, 1, 0, 56),
    (1024, 256, 1, 1, 0, 14),
    (512, 512, 3, 1, 1, 7),
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("c_in", "c_out", "kernel", "stride", "padding", "spatial"), CONV_SHAPES)
def test_sparse_conv_within_2x_of_torch(cuda_backend, dtype, c_in, c_out, kernel, stride, padding, spatial):
    g = torch.Generator().manual_seed(c_in + c_out + kernel)
    weight = torch.randn(c_out, c_in, kernel, kernel, generator=g) / (c_in * kernel * kernel) ** 0.5
    weight = (weight * nm_mask(weight.abs(), "2:4")).to(dtype)
    bias = torch.randn(c_out, generator=g).to(dtype).cuda()
    x = torch.randn(2, c_in, spatial, spatial, device="cuda", dtype=dtype)
    values, meta = pack(to_reduction_view(weight, "rsc").contiguous())
    p = conv_output_size(spatial, kernel, stride, padding, 1)
    cols = im2col_rsc(x, kernel, stride, padding, 1)
    out = rows_to_nchw(kc.sparse_gemm(values, meta, cols, bias, "relu"), 2, p, p)
    wc = weight.cuda()
    ref32 = F.relu(F.conv2d(x.float(), wc.float(), bias.float(), stride, padding))
    torch_lowp = F.relu(F.conv2d(x, wc, bias, stride, padding))
    assert_within_2x_of_torch(out, ref32, torch_lowp, f"conv {c_in}->{c_out} k{kernel} s{stride} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("channels_last", [True, False])
@pytest.mark.parametrize(
    ("channels", "kernel", "stride", "padding", "dilation", "k_pad"),
    [(64, 3, 1, 1, 1, 576), (16, 3, 2, 1, 2, 160), (3, 7, 2, 3, 1, 160), (8, 1, 1, 0, 1, 8)],
)
def test_im2col_kernel_is_bit_exact(
    cuda_backend, dtype, channels_last, channels, kernel, stride, padding, dilation, k_pad
):
    x = torch.randn(2, channels, 15, 13, device="cuda", dtype=dtype)
    if channels_last:
        x = x.to(memory_format=torch.channels_last)
    got = kc.im2col_rsc_cuda(
        x, (kernel, kernel), (stride, stride), (padding, padding), (dilation, dilation), k_pad
    )
    assert torch.equal(got, im2col_rsc_ref(x, kernel, stride, padding, dilation, k_pad))


def test_ops_trace_under_torch_compile(cuda_backend):
    values, meta = pack(masked_weight(256, 256, torch.float16, 3))
    bias = torch.randn(256, device="cuda", dtype=torch.float16)

    def linear_gelu(t):
        return kc.sparse_gemm(values, meta, t, bias, "gelu")

    t = torch.randn(4, 50, 256, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.compile(linear_gelu, fullgraph=True)(t), linear_gelu(t))

    # 64 channels x 3 x 3 = 576 reduction columns (a multiple of 64, as the sm80 kernel needs)
    values_conv, meta_conv = pack(masked_weight(128, 576, torch.float16, 4))

    def conv_relu(x):
        cols = torch.ops.knsparse_cuda.im2col_rsc(x, [3, 3], [1, 1], [1, 1], [1, 1], 576)
        return torch.ops.knsparse_cuda.sparse_gemm(values_conv, meta_conv, cols, None, "relu")

    x = torch.randn(2, 64, 10, 10, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.compile(conv_relu, fullgraph=True, dynamic=True)(x), conv_relu(x))


def test_opcheck(cuda_backend):
    values, meta = pack(masked_weight(128, 128, torch.float16, 5))
    x = torch.randn(20, 128, device="cuda", dtype=torch.float16)
    bias = torch.randn(128, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.knsparse_cuda.sparse_gemm.default, (values, meta, x, bias, "gelu"))
    img = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float16)
    torch.library.opcheck(
        torch.ops.knsparse_cuda.im2col_rsc.default, (img, [3, 3], [2, 2], [1, 1], [1, 1], 80)
    )
