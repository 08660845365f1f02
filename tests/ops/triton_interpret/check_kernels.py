"""Triton kernels vs their references, on small ragged shapes.

Run by tests/ops/test_triton_kernels.py in a fresh process: with ``TRITON_INTERPRET=1`` on CPU (set
before triton is imported), or compiled on CUDA tensors when a GPU is present.
"""

import pytest
import torch

from knsparse.kernels.nmf import nmf_ref, nmf_triton
from knsparse.kernels.residual import residual_nm_ref, residual_nm_triton, residual_ref, residual_triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def ragged(seed: int, rank: int, shapes, mp: int, np_: int):
    g = torch.Generator().manual_seed(seed)
    x = torch.full((len(shapes), mp, np_), float("nan"))  # padding the kernels must never read
    for b, (m, n) in enumerate(shapes):
        x[b, :m, :n] = torch.rand(m, n, generator=g)
    v = torch.rand(len(shapes), mp, rank, generator=g)
    h = torch.rand(len(shapes), rank, np_, generator=g)
    sizes = torch.tensor(shapes, dtype=torch.int32)
    return [t.to(DEVICE) for t in (x, v, h, sizes)]


@pytest.mark.parametrize(
    ("rank", "shapes", "mp", "np_"),
    [
        (3, [(40, 70), (33, 70), (5, 9)], 40, 70),  # several row blocks and column tiles, tails
        (1, [(16, 9), (16, 9)], 16, 16),  # per-channel style: rank 1, narrow
        (7, [(20, 32)], 20, 32),
    ],
)
def test_nmf_kernel_matches_reference(rank, shapes, mp, np_):
    x, v0, h0, sizes = ragged(rank, rank, shapes, mp, np_)
    ref = nmf_ref(x, v0, h0, sizes, iters=4)
    out = nmf_triton(x, v0, h0, sizes, iters=4)
    for a, b in zip(out, ref, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def test_residual_kernel_matches_reference():
    x, v, h, sizes = ragged(0, 5, [(40, 70), (9, 33)], 40, 70)
    v, h = nmf_ref(x, v, h, sizes, iters=2)
    torch.testing.assert_close(residual_triton(x, v, h, sizes), residual_ref(x, v, h, sizes))


@pytest.mark.parametrize("pattern", ["2:4", "1:4", "4:8", "8:16", "3:6"])
def test_fused_nm_kernel_matches_reference(pattern):
    x, v, h, sizes = ragged(1, 4, [(24, 48), (7, 96), (24, 96)], 24, 96)
    v, h = nmf_ref(x, v, h, sizes, iters=2)
    v[0, :4] = 0  # rows with exact ties: tie-break must match nm_mask (lowest index wins)
    x[0, :4, :16] = 0.25
    s_ref, keep_ref = residual_nm_ref(x, v, h, sizes, pattern)
    s, keep = residual_nm_triton(x, v, h, sizes, pattern)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(keep, keep_ref)


@pytest.mark.parametrize("pattern", ["2:4", "8:16"])
def test_fused_nm_kernel_along_rows_matches_reference(pattern):
    x, v, h, sizes = ragged(2, 3, [(48, 20), (32, 37), (16, 5)], 48, 40)
    v, h = nmf_ref(x, v, h, sizes, iters=2)
    h[0, :, :3] = 0  # columns whose residual is X itself, with ties planted below
    x[0, :16, :3] = 0.5
    s_ref, keep_ref = residual_nm_ref(x, v, h, sizes, pattern, along_rows=True)
    s, keep = residual_nm_triton(x, v, h, sizes, pattern, along_rows=True)
    torch.testing.assert_close(s, s_ref)
    assert torch.equal(keep, keep_ref)
