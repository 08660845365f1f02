"""Batched NMF: reference semantics, the C twin, padding, edge cases, the custom op."""

import itertools

import numpy as np
import pytest
import torch
from sklearn.decomposition import NMF

from knsparse.kernels import nmf_cpu as native
from knsparse.kernels.nmf import EPS, nmf_cpu, nmf_init, nmf_mu, nmf_ref

needs_compiler = pytest.mark.skipif(not native.native_available(3), reason="no C compiler for nmf_cpu.c")


def textbook_mu(
    x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, iters: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Lee-Seung updates for one unpadded matrix, written out in float64."""
    x, v, h = x.double(), v.double().clone(), h.double().clone()
    for _ in range(iters):
        v = v * (x @ h.T) / (v @ (h @ h.T) + EPS)
        h = h * (v.T @ x) / ((v.T @ v) @ h + EPS)
    return v, h


def ragged_bucket(seed: int = 0, rank: int = 3):
    """Three matrices of different real shapes padded into one [3, 24, 37] bucket."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(24, 37), (17, 37), (9, 20)]
    x = torch.zeros(3, 24, 37)
    for b, (m, n) in enumerate(shapes):
        x[b, :m, :n] = torch.rand(m, n, generator=g)
    v0 = torch.rand(3, 24, rank, generator=g)
    h0 = torch.rand(3, rank, 37, generator=g)
    return x, v0, h0, torch.tensor(shapes, dtype=torch.int32)


def test_reference_matches_textbook_updates_per_matrix():
    x, v0, h0, sizes = ragged_bucket()
    v, h = nmf_ref(x, v0, h0, sizes, iters=25)
    for b, (m, n) in enumerate(sizes.tolist()):
        vt, ht = textbook_mu(x[b, :m, :n], v0[b, :m], h0[b, :, :n], 25)
        torch.testing.assert_close(v[b, :m].double(), vt, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(h[b, :, :n].double(), ht, rtol=1e-4, atol=1e-6)


def test_padding_is_masked_and_returned_as_zero():
    x, v0, h0, sizes = ragged_bucket()
    v, h = nmf_ref(x, v0, h0, sizes, iters=5)
    garbage = x.clone()
    garbage[1, 17:] = float("nan")
    garbage[2, :, 20:] = 1e30
    v2, h2 = nmf_ref(garbage, v0, h0, sizes, iters=5)
    torch.testing.assert_close(v2, v)
    torch.testing.assert_close(h2, h)
    assert v[1, 17:].abs().sum() == 0 and h[2, :, 20:].abs().sum() == 0


def test_frobenius_loss_never_increases():
    x, v0, h0, sizes = ragged_bucket()
    losses = []
    for iters in (0, 1, 2, 5, 20, 60):
        v, h = nmf_ref(x, v0, h0, sizes, iters)
        losses.append(float(((x - v @ h) ** 2).sum()))
    assert all(b <= a * (1 + 1e-6) for a, b in itertools.pairwise(losses))


def test_reconstruction_error_matches_scikit_learn_mu():
    """Same algorithm as sklearn's solver="mu": after the same number of iterations from random
    starts, the relative reconstruction errors agree to well under 1%."""
    g = torch.Generator().manual_seed(3)
    x = torch.rand(60, 45, generator=g) ** 2
    errs = []
    for seed in range(3):
        v0, h0 = nmf_init(x[None], 5, torch.Generator().manual_seed(seed))
        v, h = nmf_mu(x[None], v0, h0, torch.tensor([[60, 45]], dtype=torch.int32), iters=150)
        errs.append(float((x - v[0] @ h[0]).norm() / x.norm()))
    sk = NMF(5, solver="mu", init="random", max_iter=150, tol=0, random_state=0)
    w = sk.fit_transform(x.numpy())
    sk_err = float(np.linalg.norm(x.numpy() - w @ sk.components_) / np.linalg.norm(x.numpy()))
    assert abs(np.mean(errs) - sk_err) / sk_err < 0.01


def test_zero_rows_columns_and_all_zero_matrix_stay_finite():
    x, v0, h0, sizes = ragged_bucket()
    x[0, 3] = 0
    x[0, :, 5] = 0
    x[2] = 0
    v, h = nmf_mu(x, v0, h0, sizes, iters=30)
    assert torch.isfinite(v).all() and torch.isfinite(h).all()
    assert (v[2] @ h[2]).abs().max() == 0


def test_init_is_seeded_and_scaled():
    x = torch.full((2, 30, 20), 4.0)
    v1, h1 = nmf_init(x, 4, torch.Generator().manual_seed(1))
    v2, h2 = nmf_init(x, 4, torch.Generator().manual_seed(1))
    assert torch.equal(v1, v2) and torch.equal(h1, h2)
    assert v1.max() <= 1.0 and v1.min() >= 0  # uniform [0, 1) * sqrt(4 / 4)
    assert abs(float((v1 @ h1).mean()) - 4 * 0.25) < 0.15  # E[VH] = r * scale^2 / 4 = mean(X) / 4


@needs_compiler
@pytest.mark.parametrize("rank", [1, 3, 7])
def test_c_twin_matches_reference(rank):
    x, v0, h0, sizes = ragged_bucket(seed=rank, rank=rank)
    x[1, 17:] = float("nan")  # padding the C kernel must not read
    ref = nmf_ref(x, v0, h0, sizes, iters=40)
    out = nmf_cpu(x, v0, h0, sizes, iters=40)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)


@needs_compiler
def test_c_twin_is_independent_of_thread_count():
    x, v0, h0, sizes = ragged_bucket()
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = nmf_cpu(x, v0, h0, sizes, iters=20)
        torch.set_num_threads(3)
        three = nmf_cpu(x, v0, h0, sizes, iters=20)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(one, three, strict=True))


def test_native_disabled_falls_back_to_reference(monkeypatch):
    x, v0, h0, sizes = ragged_bucket()
    monkeypatch.setattr(native, "_library", lambda rank: None)
    out = nmf_cpu(x, v0, h0, sizes, iters=10)
    ref = nmf_ref(x, v0, h0, sizes, iters=10)
    assert all(torch.equal(a, b) for a, b in zip(out, ref, strict=True))


@pytest.mark.parametrize(
    ("change", "error"),
    [
        (lambda a: {**a, "x": a["x"].double()}, TypeError),
        (lambda a: {**a, "v0": a["v0"][:, :5]}, ValueError),
        (lambda a: {**a, "h0": a["h0"][:, :2]}, ValueError),
        (lambda a: {**a, "sizes": a["sizes"].long()}, TypeError),
        (lambda a: {**a, "sizes": a["sizes"] + 100}, ValueError),
    ],
)
def test_bad_inputs_raise(change, error):
    x, v0, h0, sizes = ragged_bucket()
    args = change({"x": x, "v0": v0, "h0": h0, "sizes": sizes})
    with pytest.raises(error):
        nmf_mu(args["x"], args["v0"], args["h0"], args["sizes"], iters=1)


def test_custom_op_schema_and_fake_kernel():
    x, v0, h0, sizes = ragged_bucket()
    torch.library.opcheck(
        torch.ops.knsparse.nmf_mu.default,
        (x, v0, h0, sizes, 3, EPS),
        test_utils=("test_schema", "test_faketensor"),
    )


def test_eager_calls_skip_the_custom_op_and_tracing_uses_it():
    """Eager calls run the kernel directly (no first-call import of torch._dynamo) with the custom
    op's results; fake tensors (what torch.compile / torch.export trace with) are not eager."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from knsparse.kernels.launch import eager

    x, v0, h0, sizes = ragged_bucket()
    assert eager(x, v0, h0, sizes)
    v, h = nmf_mu(x, v0, h0, sizes, iters=3)
    v_op, h_op = torch.ops.knsparse.nmf_mu(x, v0, h0, sizes, 3, EPS)
    torch.testing.assert_close((v, h), (v_op, h_op), rtol=0, atol=0)
    with FakeTensorMode() as mode:
        fx, fv, fh, fs = (mode.from_tensor(t) for t in (x, v0, h0, sizes))
        assert not eager(fx, fv, fh, fs)
    assert not eager(x.requires_grad_().as_subclass(torch.nn.Parameter))
