"""Sparse backends on a GPU against the fp32 reference under the 2x-of-PyTorch-error rule, for
Linear and Conv, fp16 and bf16: every registered backend plus knsparse-cuda through the
Backend interface; knsparse-cuda's fused epilogue (bias, ReLU, GELU) and odd shapes through
``sparse_gemm`` on both kernel families (sm80 kernels on 8.x, and through their compute_80
PTX on 9.0) and both Hopper configurations; the im2col kernel bit-exact; CUDA-graph capture,
a side stream, chained layers feeding attention; the custom ops traced by torch.compile and
checked by torch.library.opcheck.

Skipped without CUDA (conftest). A backend that cannot run here is skipped with its reason;
KNSPARSE_REQUIRE_CUDA_BACKEND=1 (GPU sessions) turns a missing knsparse-cuda into a failure.
"""

from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

import knsparse as ks
from knsparse import backends
from knsparse.backends import ConvSpec, LinearSpec
from knsparse.backends import knsparse_cuda as kc
from knsparse.core.masks import nm_mask, to_reduction_view
from knsparse.core.pack import pack_24
from knsparse.core.pattern import Pattern
from knsparse.ops import gemm
from knsparse.ops.device import unavailable_reason
from knsparse.ops.im2col import conv_output_size, im2col_rsc, im2col_rsc_cuda, im2col_rsc_ref, rows_to_nchw
from knsparse.ops.meta import prepare_meta

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
    skip_unless_usable(unavailable_reason(), kc.KNSPARSE_CUDA.name)


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


def pack(w: torch.Tensor, arch: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """values + metadata as knsparse.core.pack writes them, prepared for ``arch`` (default: this GPU)."""
    p = pack_24(w.cuda())
    return p.values, prepare_meta(p.meta, arch)


def kernel_variants() -> list[tuple[str, str]]:
    """(meta arch, Hopper config) pairs this GPU runs: sm80 everywhere (SASS on 8.x, compute_80
    PTX on 9.0), sm90 large and small on 9.0."""
    if torch.cuda.is_available() and torch.cuda.get_device_capability() == (9, 0):
        return [("sm80", "auto"), ("sm90", "large"), ("sm90", "small")]
    return [("sm80", "auto")]


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
    (4096, 1024, 333),  # rows spanning 32 / 64 tiles, an odd token count
]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(("rows", "depth", "tokens"), LINEAR_SHAPES)
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
@pytest.mark.parametrize("with_bias", [True, False])
@pytest.mark.parametrize(("arch", "config"), kernel_variants())
def test_sparse_linear_within_2x_of_torch(
    cuda_backend, dtype, rows, depth, tokens, activation, with_bias, arch, config
):
    w = masked_weight(rows, depth, dtype, seed=rows + depth)
    values, meta = pack(w, arch)
    x = torch.randn(tokens, depth, device="cuda", dtype=dtype)
    bias = torch.randn(rows, device="cuda", dtype=dtype) if with_bias else None
    out = gemm.sparse_gemm(values, meta, x, bias, activation, config)
    act = ACT[activation]
    wc = w.cuda()
    ref32 = act(F.linear(x.float(), wc.float(), None if bias is None else bias.float()))
    torch_lowp = act(F.linear(x, wc, bias))
    assert_within_2x_of_torch(
        out, ref32, torch_lowp, f"linear {rows}x{depth} tokens={tokens} {dtype} {activation}"
    )


@pytest.mark.parametrize(("arch", "config"), kernel_variants())
def test_output_is_token_major_and_contiguous(cuda_backend, arch, config):
    values, meta = pack(masked_weight(256, 128, torch.float16, 0), arch)
    x = torch.randn(3, 67, 128, device="cuda", dtype=torch.float16)
    out = gemm.sparse_gemm(values, meta, x, config=config)
    assert out.shape == (3, 67, 256) and out.is_contiguous()


@pytest.mark.parametrize(("arch", "config"), kernel_variants())
def test_strided_misaligned_and_expanded_activations(cuda_backend, arch, config):
    w = masked_weight(128, 256, torch.float16, 1)
    values, meta = pack(w, arch)
    wide = torch.randn(50, 264, device="cuda", dtype=torch.float16)
    flat = torch.randn(50 * 256 + 1, device="cuda", dtype=torch.float16)
    row = torch.randn(1, 256, device="cuda", dtype=torch.float16)
    for x in (wide[:, :256], flat[1:].view(50, 256), row.expand(7, 256), wide[::2, :256]):
        want = gemm.sparse_gemm_ref(values, meta, x)
        torch.testing.assert_close(
            gemm.sparse_gemm(values, meta, x, config=config), want, rtol=1e-2, atol=1e-2
        )


def test_hopper_metadata_is_refused_off_hopper(cuda_backend):
    if torch.cuda.get_device_capability() == (9, 0):
        pytest.skip("Hopper runs both metadata layouts")
    values, meta = pack(masked_weight(64, 128, torch.float16, 2), "sm90")
    x = torch.randn(8, 128, device="cuda", dtype=torch.float16)
    with pytest.raises(RuntimeError, match="no arch 90 kernel for compute capability"):
        gemm.sparse_gemm(values, meta, x)


def test_cuda_graph_replay_matches_eager_and_follows_new_inputs(cuda_backend):
    values, meta = pack(masked_weight(768, 768, torch.float16, 6))
    bias = torch.randn(768, device="cuda", dtype=torch.float16)
    static_x = torch.randn(197, 768, device="cuda", dtype=torch.float16)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up (workspace, lazy init) outside the capture
        gemm.sparse_gemm(values, meta, static_x, bias, "gelu")
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = gemm.sparse_gemm(values, meta, static_x, bias, "gelu")
    for seed in range(3):
        static_x.copy_(torch.randn(197, 768, device="cuda", dtype=torch.float16) * (seed + 1))
        graph.replay()
        torch.testing.assert_close(static_out, gemm.sparse_gemm(values, meta, static_x, bias, "gelu"))


def test_side_stream_result_equals_default_stream(cuda_backend):
    values, meta = pack(masked_weight(512, 256, torch.bfloat16, 7))
    x = torch.randn(3, 197, 256, device="cuda", dtype=torch.bfloat16)
    want = gemm.sparse_gemm(values, meta, x)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        got = gemm.sparse_gemm(values, meta, x)
    torch.cuda.current_stream().wait_stream(side)
    assert torch.equal(got, want)


def test_chained_sparse_layers_feed_attention_and_the_next_gemm(cuda_backend):
    """A ViT block's GEMMs back to back (qkv -> fused attention -> proj -> fc1+GELU -> fc2): every
    output feeds PyTorch's fused attention or the next GEMM without a copy."""
    dim, heads, batch, tokens, dtype = 256, 4, 3, 197, torch.float16
    weights = [
        masked_weight(o, i, dtype, s)
        for s, (o, i) in enumerate([(3 * dim, dim), (dim, dim), (4 * dim, dim), (dim, 4 * dim)])
    ]
    packs = [pack(w) for w in weights]
    x = torch.randn(batch, tokens, dim, device="cuda", dtype=dtype)

    def block(t, linear):
        q, k, v = linear(0, t).reshape(batch, tokens, 3, heads, dim // heads).permute(2, 0, 3, 1, 4)
        a = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(batch, tokens, dim)
        return linear(3, linear(2, linear(1, a), "gelu"))

    def sparse(i, t, act="none"):
        return gemm.sparse_gemm(*packs[i], t, None, act)

    def dense(i, t, act="none"):  # PyTorch's own GEMM in the dtype of t
        return ACT[act](F.linear(t, weights[i].cuda().to(t.dtype)))

    out = block(x, sparse)
    ref32 = block(x.float(), dense)
    torch_lowp = block(x, dense)
    assert_within_2x_of_torch(out, ref32, torch_lowp, "chained ViT block")


@pytest.mark.parametrize("tokens", [1, 5, 197 * 3])
def test_odd_token_counts_through_backend_auto(cuda_backend, tokens):
    lin = torch.nn.Linear(384, 200).half().cuda()
    mask = ks.nm_mask(lin.weight.detach().abs(), "2:4")
    sparse = ks.SparseLinear.from_dense(lin, mask, backend="auto")
    x = torch.randn(tokens, 384, device="cuda", dtype=torch.float16)
    with torch.no_grad():
        ref32 = F.linear(x.float(), (lin.weight * mask).float(), lin.bias.float())
        torch_lowp = F.linear(x, lin.weight * mask, lin.bias)
        assert_within_2x_of_torch(sparse(x), ref32, torch_lowp, f"backend=auto tokens={tokens}")


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
    out = rows_to_nchw(gemm.sparse_gemm(values, meta, cols, bias, "relu"), 2, p, p)
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
    got = im2col_rsc_cuda(x, kernel, stride, padding, dilation, k_pad)
    assert torch.equal(got, im2col_rsc_ref(x, kernel, stride, padding, dilation, k_pad))


def test_ops_trace_under_torch_compile(cuda_backend):
    values, meta = pack(masked_weight(256, 256, torch.float16, 3))
    bias = torch.randn(256, device="cuda", dtype=torch.float16)

    def linear_gelu(t):
        return gemm.sparse_gemm(values, meta, t, bias, "gelu")

    t = torch.randn(4, 50, 256, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.compile(linear_gelu, fullgraph=True)(t), linear_gelu(t))

    # 64 channels x 3 x 3 = 576 reduction columns (a multiple of 64, as the sm80 kernel needs)
    values_conv, meta_conv = pack(masked_weight(128, 576, torch.float16, 4))

    def conv_relu(x):
        cols = torch.ops.knsparse.im2col_rsc(x, [3, 3], [1, 1], [1, 1], [1, 1], 576)
        return torch.ops.knsparse.sparse_gemm(values_conv, meta_conv, cols, None, "relu", "auto")

    x = torch.randn(2, 64, 10, 10, device="cuda", dtype=torch.float16)
    torch.testing.assert_close(torch.compile(conv_relu, fullgraph=True, dynamic=True)(x), conv_relu(x))


def test_opcheck(cuda_backend):
    values, meta = pack(masked_weight(128, 128, torch.float16, 5))
    x = torch.randn(20, 128, device="cuda", dtype=torch.float16)
    bias = torch.randn(128, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.knsparse.sparse_gemm.default, (values, meta, x, bias, "gelu", "auto"))
    img = torch.randn(2, 8, 9, 9, device="cuda", dtype=torch.float16)
    torch.library.opcheck(torch.ops.knsparse.im2col_rsc.default, (img, [3, 3], [2, 2], [1, 1], [1, 1], 80))
