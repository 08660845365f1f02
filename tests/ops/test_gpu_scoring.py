"""CUDA: the Triton kernels behind the custom ops at realistic shapes, and YOPO on the GPU."""

import pytest
import torch

from knsparse.kernels.nmf import nmf_mu, nmf_ref
from knsparse.kernels.residual import residual_nm_mask, residual_nm_ref
from knsparse.models import resnet_tiny_digits
from knsparse.pruning.score import yopo, yopo_nm_masks

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]


def bucket(b: int, m: int, n: int, rank: int):
    g = torch.Generator().manual_seed(0)
    x = torch.rand(b, m, n, generator=g)
    v0 = torch.rand(b, m, rank, generator=g)
    h0 = torch.rand(b, rank, n, generator=g)
    sizes = torch.tensor([[m, n]] + [[m - 7, n - 16]] * (b - 1), dtype=torch.int32)
    return x, v0, h0, sizes


def test_triton_nmf_matches_reference_at_resnet_shapes():
    cpu = bucket(4, 256, 1152, 7)
    cuda = [t.cuda() for t in cpu]
    v, h = nmf_mu(*cuda, iters=50)
    v_ref, h_ref = nmf_ref(*cpu, iters=50)
    torch.testing.assert_close(v.cpu(), v_ref, rtol=2e-3, atol=1e-5)
    torch.testing.assert_close(h.cpu(), h_ref, rtol=2e-3, atol=1e-5)


def test_fused_residual_nm_matches_reference_on_cuda():
    x, v0, h0, sizes = bucket(3, 128, 576, 7)
    v, h = nmf_ref(x, v0, h0, sizes, iters=5)
    s, keep = residual_nm_mask(x.cuda(), v.cuda(), h.cuda(), sizes.cuda(), "2:4")
    s_ref, keep_ref = residual_nm_ref(x, v, h, sizes, "2:4")
    torch.testing.assert_close(s.cpu(), s_ref, rtol=1e-4, atol=1e-5)
    # Scores within rounding of each other can swap inside a group; allow a handful of flips.
    assert (keep.cpu() != keep_ref).float().mean() < 1e-3


def test_yopo_on_cuda_agrees_with_cpu():
    model = resnet_tiny_digits()
    cpu = yopo(model, iters=100)
    gpu = yopo(model.cuda(), iters=100)
    for name, s in cpu.items():
        assert gpu[name].is_cuda
        torch.testing.assert_close(gpu[name].cpu(), s, rtol=1e-2, atol=1e-3)
    masks = yopo_nm_masks(model, "2:4", iters=100, layers=[n for n in cpu if n != "conv1"])
    assert all(m.is_cuda for m in masks.values())
