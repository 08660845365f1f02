"""knsparse.ops takes arrays from other libraries (issue 24, item 4): every public function with
a CPU path gives, for NumPy arrays (they expose ``__dlpack__``), exactly what it gives for torch
tensors and shares their memory where the op is a view; anything else is a TypeError naming the
argument. The CuPy GEMM calls are the gpu-marked tests at the end (they skip without CUDA or
CuPy)."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

from knsparse.core.masks import nm_mask
from knsparse.core.pack import pack_24
from knsparse.ops import (
    activate,
    conv2d_via_im2col_ref,
    dense_weight,
    im2col_rsc,
    im2col_rsc_ref,
    prepare_meta,
    rows_to_nchw,
    sparse_gemm,
    sparse_gemm_ref,
)
from knsparse.ops.device import unavailable_reason
from knsparse.ops.im2col import im2col_rsc_cuda
from knsparse.ops.interop import to_torch, to_torch_optional

ROWS, DEPTH, TOKENS = 64, 128, 24


def packed(dtype: torch.dtype = torch.float16, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """A 2:4 weight [ROWS, DEPTH], packed: (dense, values, int16 meta)."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(ROWS, DEPTH, generator=g) / DEPTH**0.5
    w = (w * nm_mask(w.abs(), "2:4")).to(dtype)
    p = pack_24(w)
    return w, p.values, p.meta


def gemm_operands() -> dict[str, torch.Tensor]:
    _, values, meta = packed()
    g = torch.Generator().manual_seed(1)
    x = torch.randn(TOKENS, DEPTH, generator=g).half()
    bias = torch.randn(ROWS, generator=g).half()
    return {"values": values, "meta": meta, "x": x, "bias": bias}


def shares_memory(out: torch.Tensor, array: np.ndarray) -> bool:
    return np.shares_memory(out.numpy(), array)


def test_to_torch_views_numpy_and_keeps_tensors():
    a = np.arange(12, dtype=np.float16).reshape(3, 4)
    t = to_torch(a, "a")
    assert isinstance(t, torch.Tensor) and t.dtype == torch.float16 and tuple(t.shape) == (3, 4)
    assert shares_memory(t, a) and torch.equal(t, torch.tensor(a))
    strided = a[:, ::2]  # positive strides view as they are
    view = to_torch(strided, "a")
    assert shares_memory(view, a) and torch.equal(view, torch.tensor(strided))
    x = torch.ones(2)
    assert to_torch(x, "x") is x
    assert to_torch_optional(None, "bias") is None


@pytest.mark.parametrize("bad", [[1.0, 2.0], "x", 3, None, object()], ids=repr)
def test_to_torch_refuses_non_arrays_naming_the_argument(bad):
    with pytest.raises(TypeError, match=r"^weight must be a torch\.Tensor or an array exposing __dlpack__"):
        to_torch(bad, "weight")


def test_to_torch_refuses_what_cannot_be_shared():
    with pytest.raises(TypeError, match=r"^x \(ndarray\) cannot be shared with torch"):
        to_torch(np.array(["a", "b"]), "x")
    # torch.from_dlpack aborts the interpreter on a negative stride; the helper refuses it first
    with pytest.raises(ValueError, match=r"^x has a negative stride"):
        to_torch(np.arange(4.0)[::-1], "x")


def test_sparse_gemm_ref_numpy_equals_torch():
    t = gemm_operands()
    arrays = {k: v.numpy() for k, v in t.items()}
    for activation in ("none", "relu", "gelu"):
        want = sparse_gemm_ref(t["values"], t["meta"], t["x"], t["bias"], activation)
        got = sparse_gemm_ref(arrays["values"], arrays["meta"], arrays["x"], arrays["bias"], activation)
        assert isinstance(got, torch.Tensor) and torch.equal(got, want), activation
    # and against the dense weight it packs
    w, _, _ = packed()
    ref = (t["x"].float() @ w.float().t() + t["bias"].float()).half()
    assert torch.equal(sparse_gemm_ref(arrays["values"], arrays["meta"], arrays["x"], arrays["bias"]), ref)


def test_dense_weight_and_prepare_meta_numpy_equal_torch():
    w, values, meta = packed()
    assert torch.equal(dense_weight(values.numpy(), meta.numpy()), w)
    sm80 = prepare_meta(meta.numpy(), "sm80")
    assert torch.equal(sm80, meta) and shares_memory(sm80, meta.numpy())  # sm80: the same memory
    meta_np = meta.numpy()
    sm90 = prepare_meta(meta_np, "sm90")
    assert torch.equal(sm90, prepare_meta(meta, "sm90"))
    assert torch.equal(dense_weight(values.numpy(), sm90.numpy()), w)


def test_activate_and_rows_to_nchw_numpy_equal_torch_and_share_memory():
    y = torch.randn(2 * 3 * 5, 7, generator=torch.Generator().manual_seed(2))
    y_np = y.numpy().copy()
    for activation in ("relu", "gelu"):
        assert torch.equal(activate(y_np, activation), activate(y, activation))
    same = activate(y_np, "none")
    assert torch.equal(same, y) and shares_memory(same, y_np)
    nchw = rows_to_nchw(y_np, 2, 3, 5)
    assert torch.equal(nchw, rows_to_nchw(y, 2, 3, 5)) and shares_memory(nchw, y_np)


def test_im2col_and_conv_numpy_equal_torch():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(2, 8, 9, 7, generator=g)
    weight = torch.randn(16, 8, 3, 3, generator=g)
    bias = torch.randn(16, generator=g)
    x_np, w_np, b_np = x.numpy(), weight.numpy(), bias.numpy()
    geometry = dict(kernel_size=3, stride=2, padding=1, dilation=1, k_pad=80)
    want = im2col_rsc_ref(x, **geometry)
    assert torch.equal(im2col_rsc_ref(x_np, **geometry), want)
    assert torch.equal(im2col_rsc(x_np, **geometry), want)  # CPU: the reference path
    conv = conv2d_via_im2col_ref(x_np, w_np, b_np, stride=2, padding=1)
    assert torch.equal(conv, conv2d_via_im2col_ref(x, weight, bias, stride=2, padding=1))
    torch.testing.assert_close(conv, torch.nn.functional.conv2d(x, weight, bias, stride=2, padding=1))


def test_native_entry_points_check_numpy_inputs_as_torch_ones():
    """sparse_gemm / im2col_rsc_cuda convert first, then run the same checks (no CUDA here: the
    same device error; a dtype mismatch: the same TypeError)."""
    t = gemm_operands()
    arrays = {k: v.numpy() for k, v in t.items()}

    def error(fn, *args) -> tuple[type, str]:
        with pytest.raises(Exception) as info:
            fn(*args)
        return info.type, str(info.value)

    assert error(sparse_gemm, *arrays.values()) == error(sparse_gemm, *t.values())
    bad_x = t["x"].float()
    assert error(sparse_gemm, arrays["values"], arrays["meta"], bad_x.numpy()) == error(
        sparse_gemm, t["values"], t["meta"], bad_x
    )
    x = torch.randn(1, 8, 5, 5).half()
    assert error(im2col_rsc_cuda, x.numpy(), 3) == error(im2col_rsc_cuda, x, 3)


def _tensor_arguments() -> list:
    """pytest params (function, positional arguments, index of the tensor argument, its name)
    for every tensor argument of every public ops function."""
    t = gemm_operands()
    w, values, meta = packed()
    x4 = torch.randn(1, 8, 5, 5)
    gemm = [t["values"], t["meta"], t["x"], t["bias"]]
    cases = []
    for fn in (sparse_gemm, sparse_gemm_ref):
        cases += [(fn, gemm, i, name) for i, name in enumerate(("values", "meta", "x", "bias"))]
    cases += [(dense_weight, [values, meta], i, name) for i, name in enumerate(("values", "meta"))]
    cases += [(prepare_meta, [meta, "sm80"], 0, "meta"), (activate, [w, "relu"], 0, "y")]
    cases += [(rows_to_nchw, [torch.zeros(25, 4), 1, 5, 5], 0, "y")]
    cases += [(fn, [x4, 3], 0, "x") for fn in (im2col_rsc, im2col_rsc_ref, im2col_rsc_cuda)]
    conv = [x4, torch.randn(4, 8, 3, 3), torch.randn(4)]
    cases += [(conv2d_via_im2col_ref, conv, i, name) for i, name in enumerate(("x", "weight", "bias"))]
    return [pytest.param(*case, id=f"{case[0].__name__}-{case[3]}") for case in cases]


@pytest.mark.parametrize("fn, args, index, name", _tensor_arguments())
def test_wrong_type_is_a_type_error_naming_the_argument(fn, args, index, name):
    args = list(args)
    args[index] = args[index].tolist()  # a nested list: array-like, but no array protocol
    with pytest.raises(TypeError, match=rf"^{name} must be a torch\.Tensor or an array exposing"):
        fn(*args)


# --- CuPy on a GPU ---------------------------------------------------------------------------


@pytest.fixture
def cupy_native():
    """CuPy and a GPU the native kernels serve (KNSPARSE_REQUIRE_CUDA_BACKEND=1: must be there)."""
    cupy = pytest.importorskip("cupy")
    reason = unavailable_reason()
    if reason is not None:
        if os.environ.get("KNSPARSE_REQUIRE_CUDA_BACKEND") == "1":
            pytest.fail(f"knsparse-cuda required but unavailable: {reason}")
        pytest.skip(reason)
    return cupy


def cuda_operands(cupy, dtype: torch.dtype = torch.float16):
    """The GEMM operands on the GPU, prepared for it, as torch tensors and as CuPy arrays viewing
    them (CuPy has no bfloat16: float16 only)."""
    t = {k: v.cuda() for k, v in gemm_operands().items()}
    t["meta"] = prepare_meta(t["meta"])
    return t, {k: cupy.from_dlpack(v) for k, v in t.items()}


class CudaArrayInterfaceOnly:
    """Exposes a CuPy array through ``__cuda_array_interface__`` only (as Numba's arrays do)."""

    def __init__(self, array) -> None:
        self.__cuda_array_interface__ = array.__cuda_array_interface__
        self._keep = array


@pytest.mark.gpu
@pytest.mark.parametrize("activation", ["none", "relu", "gelu"])
def test_sparse_gemm_with_cupy_arrays_equals_torch_inputs(cupy_native, activation):
    cupy = cupy_native
    t, c = cuda_operands(cupy)
    x_view = to_torch(c["x"], "x")
    assert x_view.data_ptr() == c["x"].data.ptr  # zero-copy at the boundary
    got = sparse_gemm(c["values"], c["meta"], c["x"], c["bias"], activation)
    want = sparse_gemm(t["values"], t["meta"], t["x"], t["bias"], activation)
    assert isinstance(got, torch.Tensor) and got.is_cuda
    assert torch.equal(got, want)
    ref = sparse_gemm_ref(t["values"], t["meta"], t["x"], t["bias"], activation)
    torch.testing.assert_close(got, ref, atol=2e-2, rtol=2e-2)
    back = cupy.from_dlpack(got)  # and back to CuPy without a copy
    assert back.data.ptr == got.data_ptr() and bool(cupy.array_equal(back, cupy.from_dlpack(want)))


@pytest.mark.gpu
def test_sparse_gemm_reads_cupy_work_from_a_side_stream(cupy_native):
    """x written by CuPy on its own non-blocking stream: the DLPack handshake orders that work
    before the GEMM on torch's stream, so the result matches torch inputs made after a sync."""
    cupy = cupy_native
    t, c = cuda_operands(cupy)
    tokens = 4096
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        x = cupy.tile(c["x"], (tokens // TOKENS + 1, 1))[:tokens] * 1
        x = cupy.ascontiguousarray(x)
        got = sparse_gemm(c["values"], c["meta"], x, c["bias"], "relu")
    stream.synchronize()
    torch.cuda.synchronize()
    want = sparse_gemm(t["values"], t["meta"], torch.from_dlpack(x), t["bias"], "relu")
    assert torch.equal(got, want)


@pytest.mark.gpu
def test_sparse_gemm_and_im2col_through_cuda_array_interface(cupy_native):
    cupy = cupy_native
    t, c = cuda_operands(cupy)
    wrapped = {k: CudaArrayInterfaceOnly(v) for k, v in c.items()}
    got = sparse_gemm(wrapped["values"], wrapped["meta"], wrapped["x"], wrapped["bias"])
    assert torch.equal(got, sparse_gemm(t["values"], t["meta"], t["x"], t["bias"]))
    x = cupy.random.standard_normal((2, 16, 9, 9), dtype=cupy.float32).astype(cupy.float16)
    want = im2col_rsc_cuda(torch.from_dlpack(x), 3, 1, 1, 1, 160)
    assert torch.equal(im2col_rsc_cuda(x, 3, 1, 1, 1, 160), want)
    assert torch.equal(im2col_rsc(CudaArrayInterfaceOnly(x), 3, 1, 1, 1, 160), want)
    assert torch.equal(want, im2col_rsc_ref(torch.from_dlpack(x), 3, 1, 1, 1, 160))
