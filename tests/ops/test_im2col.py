"""im2col in (R, S, C) order: the reference against F.unfold and F.conv2d, and the CUDA kernel's
index arithmetic (run on CPU through a host probe) against the reference."""

from __future__ import annotations

import subprocess

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from native_probes import build_probe

from knsparse.core.masks import to_reduction_view
from knsparse.ops.im2col import (
    conv2d_via_im2col_ref,
    conv_output_size,
    im2col_rsc,
    im2col_rsc_ref,
    rows_to_nchw,
)

# (kernel, stride, padding, dilation)
GEOMETRIES = [
    ((1, 1), (1, 1), (0, 0), (1, 1)),
    ((3, 3), (1, 1), (1, 1), (1, 1)),
    ((3, 3), (2, 2), (1, 1), (1, 1)),
    ((3, 3), (1, 1), (2, 2), (2, 2)),
    ((7, 7), (2, 2), (3, 3), (1, 1)),
    ((1, 1), (2, 2), (0, 0), (1, 1)),
    ((2, 3), (2, 1), (0, 2), (3, 1)),
    ((5, 1), (1, 3), (2, 0), (1, 2)),
]
CHANNELS = [1, 3, 8, 16]


def unfold_rsc(x: torch.Tensor, kernel, stride, padding, dilation) -> torch.Tensor:
    """F.unfold's (C, R, S)-ordered columns reordered to rows (n, p, q) x columns (r, s, c)."""
    n, c = x.shape[:2]
    cols = F.unfold(x, kernel, dilation=dilation, padding=padding, stride=stride)  # [N, C*R*S, L]
    cols = cols.reshape(n, c, kernel[0], kernel[1], -1)
    return cols.permute(0, 4, 2, 3, 1).reshape(-1, kernel[0] * kernel[1] * c)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
@pytest.mark.parametrize("channels", CHANNELS)
def test_im2col_ref_matches_unfold(kernel, stride, padding, dilation, channels):
    torch.manual_seed(0)
    x = torch.randn(2, channels, 11, 10)
    cols = im2col_rsc_ref(x, kernel, stride, padding, dilation)
    p = conv_output_size(11, kernel[0], stride[0], padding[0], dilation[0])
    q = conv_output_size(10, kernel[1], stride[1], padding[1], dilation[1])
    assert cols.shape == (2 * p * q, kernel[0] * kernel[1] * channels)
    assert torch.equal(cols, unfold_rsc(x, kernel, stride, padding, dilation))


def test_im2col_ref_reads_any_memory_layout():
    x = torch.randn(2, 8, 9, 9)
    expected = im2col_rsc_ref(x, 3, 2, 1, 1)
    assert torch.equal(im2col_rsc_ref(x.to(memory_format=torch.channels_last), 3, 2, 1, 1), expected)
    assert torch.equal(im2col_rsc_ref(x.transpose(0, 1).contiguous().transpose(0, 1), 3, 2, 1, 1), expected)


def test_im2col_k_pad_appends_zero_columns():
    x = torch.randn(1, 4, 6, 6)
    cols = im2col_rsc_ref(x, 3, 1, 1, 1, k_pad=40)
    assert cols.shape == (36, 40)
    assert torch.equal(cols[:, :36], im2col_rsc_ref(x, 3, 1, 1, 1))
    assert not cols[:, 36:].any()


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
@pytest.mark.parametrize(("c_in", "c_out"), [(1, 2), (3, 8), (16, 5)])
def test_conv2d_via_im2col_matches_conv2d(kernel, stride, padding, dilation, c_in, c_out):
    torch.manual_seed(1)
    x = torch.randn(2, c_in, 12, 9, dtype=torch.float64)
    w = torch.randn(c_out, c_in, *kernel, dtype=torch.float64)
    b = torch.randn(c_out, dtype=torch.float64)
    got = conv2d_via_im2col_ref(x, w, b, stride, padding, dilation)
    want = F.conv2d(x, w, b, stride, padding, dilation)
    assert got.shape == want.shape
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)


def test_conv2d_via_im2col_with_a_24_rsc_masked_weight():
    """The 2:4 path's algebra: the masked RSC reduction view against F.conv2d on the masked weight."""
    from knsparse.core.masks import nm_mask

    torch.manual_seed(2)
    x = torch.randn(2, 8, 10, 10, dtype=torch.float64)
    w = torch.randn(6, 8, 3, 3, dtype=torch.float64)
    w = w * nm_mask(w.abs(), "2:4")
    cols = im2col_rsc_ref(x, 3, 1, 1, 1)
    y = rows_to_nchw(cols @ to_reduction_view(w, "rsc").t(), 2, 10, 10)
    torch.testing.assert_close(y, F.conv2d(x, w, None, 1, 1, 1), rtol=1e-12, atol=1e-12)


def test_rows_to_nchw_is_a_view():
    y = torch.randn(2 * 3 * 4, 5)
    out = rows_to_nchw(y, 2, 3, 4)
    assert out.shape == (2, 5, 3, 4)
    assert out.data_ptr() == y.data_ptr()
    assert torch.equal(out[1, 2, 0, 3], y[1 * 12 + 0 * 4 + 3, 2])


def test_im2col_dispatcher_runs_the_reference_on_cpu():
    x = torch.randn(1, 8, 7, 7, dtype=torch.float16)
    assert torch.equal(im2col_rsc(x, 3, 1, 1, 1, k_pad=80), im2col_rsc_ref(x, 3, 1, 1, 1, k_pad=80))


@pytest.mark.parametrize(
    ("call", "match"),
    [
        (lambda x: im2col_rsc_ref(x, 3, k_pad=10), "k_pad=10 is smaller"),
        (lambda x: im2col_rsc_ref(x, 9), "does not fit"),
        (lambda x: im2col_rsc_ref(x[0], 3), r"\[N, C, H, W\]"),
        (lambda x: im2col_rsc_ref(x, 3, stride=0), "must be positive"),
        (lambda x: conv2d_via_im2col_ref(x, torch.randn(4, 3, 3, 3)), "groups=1"),
    ],
)
def test_bad_arguments_raise_value_errors(call, match):
    with pytest.raises(ValueError, match=match):
        call(torch.randn(1, 2, 5, 5))


def test_kernel_size_must_be_int_or_pair():
    with pytest.raises(TypeError, match="kernel_size"):
        im2col_rsc_ref(torch.randn(1, 2, 5, 5), (1, 2, 3))


# --- the CUDA kernel's body, run on CPU by tests/ops/native/im2col_probe.cpp -----------------------


@pytest.fixture(scope="module")
def im2col_probe(tmp_path_factory):
    return build_probe("im2col_probe", tmp_path_factory.mktemp("probe"), needs_cutlass=False)


PROBE_CASES = [
    # (n, c, h, w, kernel, stride, padding, dilation, k_pad, layout, expected vector width)
    (2, 8, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 80, "nhwc", 8),
    (1, 16, 9, 9, (3, 3), (2, 2), (1, 1), (2, 2), 144, "nhwc", 8),
    (2, 8, 5, 5, (1, 1), (2, 2), (0, 0), (1, 1), 8, "nhwc", 8),
    (2, 8, 7, 6, (3, 3), (1, 1), (1, 1), (1, 1), 72, "nchw", 1),
    (1, 3, 11, 11, (7, 7), (2, 2), (3, 3), (1, 1), 160, "nhwc", 1),
    (2, 4, 6, 8, (2, 3), (2, 1), (0, 2), (3, 1), 27, "nchw", 1),
]


@pytest.mark.parametrize(
    ("n", "c", "h", "w", "kernel", "stride", "padding", "dilation", "k_pad", "layout", "vec"), PROBE_CASES
)
def test_cuda_im2col_body_matches_reference(
    im2col_probe, n, c, h, w, kernel, stride, padding, dilation, k_pad, layout, vec
):
    args = [n, c, h, w, *kernel, *stride, *padding, *dilation, k_pad]
    run = subprocess.run(
        [str(im2col_probe), *map(str, args), layout], capture_output=True, text=True, check=True
    )
    assert run.stderr.strip() == f"vec={vec}"
    got = torch.from_numpy(np.loadtxt(run.stdout.splitlines(), dtype=np.int64, ndmin=2))
    # The probe fills each element with 1 + its storage offset in the given layout.
    storage = torch.arange(1, n * c * h * w + 1, dtype=torch.int64)
    x = storage.reshape(n, c, h, w) if layout == "nchw" else storage.reshape(n, h, w, c).permute(0, 3, 1, 2)
    want = im2col_rsc_ref(x, kernel, stride, padding, dilation, k_pad)
    assert torch.equal(got, want)
