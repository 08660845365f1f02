"""CPU timings of knsparse's ops, each next to its plain-PyTorch reference in the same run.

One benchmark group per op, two rows each (``knsparse`` and ``reference``), the same input for
both; before either is timed the test asserts the two outputs agree (bit-exact where the op is
exact, within the float32 tolerance of the package's tests where it is not):

==================  ===============================================  =======================================
op                  knsparse                                         reference
==================  ===============================================  =======================================
pack_24             ``ks.pack_24``                                   torch's CUTLASS converter (CPU oracle)
unpack_24           ``ks.unpack_24``                                 torch's CUTLASS ``to_dense`` (CPU oracle)
nm_mask             ``ks.nm_mask`` (stable sort per group)           ``topk`` per group + ``scatter``
nmf                 the C twin ``nmf_cpu`` (``kernels/nmf_cpu.c``)    ``nmf_ref`` (batched ``bmm``)
im2col_rsc          ``im2col_rsc_ref`` (``unfold`` windows)           ``F.unfold`` + (C,R,S)->(R,S,C) permute
permutation_step    one full ``StripeSearch.swap_gains`` table       every swap rescored from scratch
                                                                     (the greedy baseline's scoring)
calibration         ``collect_input_stats(group=4)``                 forward hooks, float64 sums
==================  ===============================================  =======================================

Sizes: ViT-B/16's MLP weight (fc1 ``[3072, 768]``) for pack/unpack/nm_mask; four ``[768, 768]``
matrices at rank 7 for NMF (YOPO's default rank); a ResNet-50 stage-1 3x3 convolution input
``[4, 64, 56, 56]`` for im2col; one 32-stripe block (128 channels) of ViT-B's fc2 search matrix
(768 rows) for the permutation step; two 224 px images through a 2-block ViT-B/16 for the
calibration pass.

    make bench-cpu      # bench/results/pytest_bench_cpu.json and .md
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_from_dense_cutlass as torch_pack,
)
from torch.sparse._semi_structured_conversions import (
    sparse_semi_structured_to_dense_cutlass as torch_unpack,
)

from knsparse.core.layers import prunable_layers
from knsparse.core.masks import nm_mask
from knsparse.core.pack import pack_24, unpack_24
from knsparse.core.pattern import Pattern
from knsparse.kernels import nmf_cpu as nmf_native
from knsparse.kernels.nmf import nmf_cpu, nmf_init, nmf_ref
from knsparse.models.vit import VisionTransformer
from knsparse.ops.im2col import im2col_rsc_ref
from knsparse.pruning.calibration import collect_input_stats
from knsparse.pruning.permutation.baseline import _swap_gains
from knsparse.pruning.permutation.objective import search_matrix
from knsparse.pruning.permutation.stripe_search import StripeSearch

IMPLS = ("knsparse", "reference")
MLP = (3072, 768)  # ViT-B/16 fc1 weight [out, in]
PATTERN = Pattern.parse("2:4")


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.fixture(scope="module")
def weight24() -> torch.Tensor:
    """A 2:4 fp16 ViT-B/16 fc1 weight."""
    mask = nm_mask(torch.rand(MLP, generator=_gen(0)), PATTERN)
    return (torch.randn(MLP, generator=_gen(1)) * mask).half()


# ---- pack / unpack ------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", IMPLS)
def test_pack_24(benchmark, record, weight24, impl):
    ours, (values, meta) = pack_24(weight24), torch_pack(weight24)
    assert torch.equal(ours.values, values) and torch.equal(ours.meta, meta)
    record("pack_24", impl, shape=list(MLP), dtype="float16")
    benchmark(pack_24 if impl == "knsparse" else torch_pack, weight24)


@pytest.mark.parametrize("impl", IMPLS)
def test_unpack_24(benchmark, record, weight24, impl):
    packed = pack_24(weight24)
    assert torch.equal(unpack_24(packed), weight24)
    assert torch.equal(torch_unpack(packed.values, packed.meta), weight24)
    record("unpack_24", impl, shape=list(MLP), dtype="float16")
    if impl == "knsparse":
        benchmark(unpack_24, packed)
    else:
        benchmark(torch_unpack, packed.values, packed.meta)


# ---- nm_mask ------------------------------------------------------------------------------------


def nm_mask_topk(scores: torch.Tensor, k: int, n: int) -> torch.Tensor:
    """Plain PyTorch: the ``k`` largest of every ``n`` consecutive scores of a row."""
    groups = scores.reshape(scores.shape[0], -1, n)
    kept = groups.topk(k, dim=-1).indices
    return torch.zeros(groups.shape, dtype=torch.bool).scatter_(-1, kept, True).reshape(scores.shape)


@pytest.mark.parametrize("impl", IMPLS)
def test_nm_mask(benchmark, record, impl):
    scores = torch.rand(MLP, generator=_gen(2))  # continuous: no ties, so both rules agree
    assert torch.equal(nm_mask(scores, PATTERN), nm_mask_topk(scores, 2, 4))
    record("nm_mask", impl, shape=list(MLP), pattern="2:4")
    if impl == "knsparse":
        benchmark(nm_mask, scores, PATTERN)
    else:
        benchmark(nm_mask_topk, scores, 2, 4)


# ---- NMF: the C twin against the bmm reference --------------------------------------------------

NMF_BATCH, NMF_SIDE, NMF_RANK, NMF_ITERS = 4, 768, 7, 20


@pytest.mark.parametrize("impl", IMPLS)
def test_nmf(benchmark, record, impl):
    if not nmf_native.native_available(NMF_RANK):
        pytest.skip("no C compiler for kernels/nmf_cpu.c: nmf_cpu is nmf_ref here")
    x = torch.randn(NMF_BATCH, NMF_SIDE, NMF_SIDE, generator=_gen(3)).abs()
    v0, h0 = nmf_init(x, NMF_RANK, _gen(4))
    sizes = torch.tensor([[NMF_SIDE, NMF_SIDE]] * NMF_BATCH, dtype=torch.int32)
    args = (x, v0, h0, sizes, NMF_ITERS)
    for a, b in zip(nmf_cpu(*args), nmf_ref(*args), strict=True):
        torch.testing.assert_close(a, b, rtol=2e-4, atol=1e-6)  # tests/ops/test_nmf.py's bound
    record(
        "nmf",
        impl,
        shape=[NMF_BATCH, NMF_SIDE, NMF_SIDE],
        rank=NMF_RANK,
        iters=NMF_ITERS,
        gflop=round(_nmf_flop() / 1e9, 3),
    )
    benchmark(nmf_cpu if impl == "knsparse" else nmf_ref, *args)


def _nmf_flop() -> float:
    """Multiply-adds x 2 of one MU iteration's products (X H^T, V^T X dominate), all iterations."""
    m = n = NMF_SIDE
    r = NMF_RANK
    per_iter = 2 * (m * n * r) * 2 + 2 * (m * r * r + r * r * n + m * r * r + r * n * r)
    return float(NMF_BATCH * NMF_ITERS * per_iter)


# ---- im2col in (R, S, C) order ------------------------------------------------------------------


def im2col_unfold(x: torch.Tensor, kernel: int, padding: int) -> torch.Tensor:
    """Plain PyTorch: ``F.unfold`` gives (C, R, S) columns; reorder them to (R, S, C)."""
    n, c = x.shape[:2]
    cols = F.unfold(x, kernel, padding=padding)  # [N, C*R*S, L]
    positions = cols.shape[-1]
    return cols.view(n, c, kernel * kernel, positions).permute(0, 3, 2, 1).reshape(n * positions, -1)


@pytest.mark.parametrize("impl", IMPLS)
def test_im2col_rsc(benchmark, record, impl):
    x = torch.randn(4, 64, 56, 56, generator=_gen(5))
    assert torch.equal(im2col_rsc_ref(x, 3, padding=1), im2col_unfold(x, 3, 1))
    record("im2col_rsc", impl, input=[4, 64, 56, 56], kernel=3, padding=1)
    if impl == "knsparse":
        benchmark(im2col_rsc_ref, x, 3, 1, 1)
    else:
        benchmark(im2col_unfold, x, 3, 1)


# ---- one permutation search step: the full swap-gain table of a block ---------------------------

BLOCK_ROWS, BLOCK_COLS = 768, 128  # ViT-B fc2 [768, 3072]: one block of search()'s 32 stripes


def _block() -> torch.Tensor:
    fc2 = torch.randn(BLOCK_ROWS, 3072, generator=_gen(6))
    return search_matrix(fc2)[:, :BLOCK_COLS].contiguous()


def _fresh_state(m: torch.Tensor) -> StripeSearch:
    state = StripeSearch(m[None], PATTERN, [_gen(7)], max_candidates=1000)
    state.cols = torch.randperm(BLOCK_COLS, generator=_gen(8)).view(1, -1, PATTERN.n)
    state.mark_changed(torch.ones(1, BLOCK_COLS // PATTERN.n, dtype=torch.bool))
    return state


def swap_gains_from_scratch(m: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """Every swap of two columns in different stripes rescored from the two new stripes (the
    greedy baseline's scoring, in chunks of 2^23 elements): ``[pairs]`` over ``triu`` pairs."""
    n = PATTERN.n
    i, j = torch.triu_indices(BLOCK_COLS, BLOCK_COLS, offset=1)
    keep = i // n != j // n
    i, j = i[keep], j[keep]
    step = max(1, (1 << 23) // (m.shape[0] * n))
    stripes = perm.view(-1, n)
    return torch.cat(
        [
            _swap_gains(m, stripes, perm, i[s : s + step], j[s : s + step], PATTERN.k)
            for s in range(0, i.numel(), step)
        ]
    )


@pytest.mark.parametrize("impl", IMPLS)
def test_permutation_step(benchmark, record, impl):
    m = _block()
    state = _fresh_state(m)
    table = state.swap_gains()[0]
    i, j = torch.triu_indices(BLOCK_COLS, BLOCK_COLS, offset=1)
    keep = i // PATTERN.n != j // PATTERN.n
    reference = swap_gains_from_scratch(m, state.perm[0])
    torch.testing.assert_close(table[i[keep], j[keep]], reference, rtol=1e-4, atol=2e-3)
    record("permutation_step", impl, block=[BLOCK_ROWS, BLOCK_COLS], pattern="2:4", swaps=int(keep.sum()))
    if impl == "knsparse":
        benchmark.pedantic(
            lambda s: s.swap_gains(), setup=lambda: ((_fresh_state(m),), {}), rounds=10, warmup_rounds=1
        )
    else:
        benchmark(swap_gains_from_scratch, m, state.perm[0])


# ---- the calibration pass -----------------------------------------------------------------------


def _vit_b2() -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=224, patch_size=16, embed_dim=768, depth=2, num_heads=12).eval()


def stats_by_hooks(model: nn.Module, layers: dict[str, nn.Module], calib: list[torch.Tensor]) -> dict:
    """Plain PyTorch: ``{layer: (Σ x², Σ x_g x_gᵀ per group of 4)}`` in float64 from forward
    pre-hooks; conv inputs through ``F.unfold`` reordered to (R, S, C)."""
    out: dict[str, list[torch.Tensor]] = {}

    def hook_for(name: str, module: nn.Module):
        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            x = inputs[0].detach()
            if isinstance(module, nn.Conv2d):
                n, c = x.shape[:2]
                kh, kw = module.kernel_size
                cols = F.unfold(x, module.kernel_size, module.dilation, module.padding, module.stride)
                rows = cols.view(n, c, kh * kw, -1).permute(0, 3, 2, 1).reshape(-1, c * kh * kw)
            else:
                rows = x.reshape(-1, x.shape[-1])
            rows = rows.double()
            groups = rows.view(rows.shape[0], -1, 4)
            sums = (rows.square().sum(0), torch.einsum("tgi,tgj->gij", groups, groups))
            out[name] = [a + b for a, b in zip(out[name], sums, strict=True)] if name in out else list(sums)

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n, m)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            for x in calib:
                model(x)
    finally:
        for h in handles:
            h.remove()
    return out


@pytest.mark.parametrize("impl", IMPLS)
def test_calibration(benchmark, record, impl):
    model = _vit_b2()
    layers = prunable_layers(model)
    calib = [torch.randn(2, 3, 224, 224, generator=_gen(9))]
    ours = collect_input_stats(model, layers, calib, group=4)
    reference = stats_by_hooks(model, layers, calib)
    assert set(ours) == set(reference) == set(layers)
    for name, (sum_sq, block) in reference.items():
        torch.testing.assert_close(ours[name].sum_sq, sum_sq, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(ours[name].block_gram, block, rtol=1e-4, atol=1e-4)
    record("calibration", impl, model="ViT-B/16 x 2 blocks", batch=[2, 3, 224, 224], layers=len(layers))
    if impl == "knsparse":
        benchmark(collect_input_stats, model, layers, calib, group=4)
    else:
        benchmark(stats_by_hooks, model, layers, calib)
