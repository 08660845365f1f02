"""Token merging: r=0 is the original model, matching/merging match naive references,
proportional attention makes merging exact duplicates lossless, remove() restores."""

from __future__ import annotations

import pytest
import torch

from knsparse.deploy import tome
from knsparse.models import resnet_tiny_digits, vit_tiny_digits


def _vit(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return vit_tiny_digits().eval()


def _matching_ref(metric: torch.Tensor, r: int) -> list[tuple[set, dict]]:
    """Per batch row: (kept A indices, {merged A index: B index}) by explicit loops."""
    out = []
    for row in metric.float():
        a, b = row[0::2], row[1::2]
        best = []
        for i in range(len(a)):
            sims = [torch.cosine_similarity(a[i], b[j], dim=0).item() for j in range(len(b))]
            j = max(range(len(b)), key=lambda jj: sims[jj])
            best.append((sims[j], i, j))
        chosen = sorted(best, key=lambda t: -t[0])[:r]
        merged = {i: j for _, i, j in chosen}
        out.append((set(range(len(a))) - set(merged), merged))
    return out


def test_r0_is_bitwise_the_unpatched_model():
    model = _vit()
    x = torch.randn(5, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        tome.apply(model, 0)
        after = model(x)
    assert tome.is_applied(model)
    assert torch.equal(before, after)


def test_remove_restores_the_original_forward():
    model = _vit()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        before = model(x)
        tome.apply(model, [3, 2, 1, 0])
        merged = model(x)
        tome.remove(model)
        restored = model(x)
    assert not torch.equal(before, merged)
    assert torch.equal(before, restored)
    assert not tome.is_applied(model)
    assert all("forward" not in vars(b) for b in model.blocks)


def test_matching_agrees_with_loop_reference():
    torch.manual_seed(1)
    metric = torch.randn(3, 11, 6)
    m = tome.bipartite_soft_matching(metric, 4)
    for row, (kept, merged) in enumerate(_matching_ref(metric, 4)):
        assert set(m.keep[row].tolist()) == kept
        assert dict(zip(m.src[row].tolist(), m.dst[row].tolist(), strict=True)) == merged


def test_merge_is_size_weighted_mean():
    torch.manual_seed(2)
    x = torch.randn(2, 7, 5)
    size = torch.randint(1, 4, (2, 7, 1)).float()
    m = tome.bipartite_soft_matching(torch.randn(2, 7, 3), 3)
    out, out_size = tome.merge_tokens(x, size, m)
    assert out.shape == (2, 4, 5) and out_size.shape == (2, 4, 1)
    for row in range(2):
        xa, xb, sa, sb = x[row, 0::2], x[row, 1::2], size[row, 0::2], size[row, 1::2]
        for pos, i in enumerate(m.keep[row].tolist()):
            torch.testing.assert_close(out[row, pos], xa[i])
        n_keep = len(m.keep[row])
        for j in range(xb.shape[0]):
            srcs = [i for i, d in zip(m.src[row].tolist(), m.dst[row].tolist(), strict=True) if d == j]
            total = sb[j] + sum((sa[i] for i in srcs), torch.zeros(1))
            mean = (xb[j] * sb[j] + sum((xa[i] * sa[i] for i in srcs), torch.zeros(5))) / total
            torch.testing.assert_close(out[row, n_keep + j], mean)
            torch.testing.assert_close(out_size[row, n_keep + j], total)
    assert out_size.sum().item() == size.sum().item()


def test_merging_exact_duplicates_is_lossless_with_proportional_attention():
    """Tokens duplicated in (A, B) pairs merge into one token of size 2; proportional
    attention then weighs it like the pair, so every later block sees the same attention."""
    model = _vit()
    torch.manual_seed(3)
    pairs = torch.randn(2, 6, 64)
    tokens = torch.cat([torch.randn(2, 1, 64), pairs.repeat_interleave(2, dim=1)], dim=1)
    with torch.no_grad():
        full = model.norm(model.blocks(tokens))[:, 0]
        tome.apply(model, [6, 0, 0, 0])
        merged = model.norm(model.blocks(tokens))
    assert merged.shape[1] == 1 + 6
    torch.testing.assert_close(merged[:, 0], full, rtol=1e-5, atol=1e-5)


def test_token_counts_follow_the_schedule():
    model = _vit()
    seen: list[int] = []
    for module in [*model.blocks, model.norm]:
        module.register_forward_pre_hook(lambda _m, args: seen.append(args[0].shape[1]))
    r = [4, 20, 5, 1]
    tome.apply(model, r)
    with torch.no_grad():
        model(torch.randn(2, 1, 8, 8))
    assert seen == tome.token_counts(17, r) == [17, 13, 7, 4, 3]


def test_schedules():
    assert tome.schedule(4, 3) == [4, 4, 4]
    dec = tome.schedule(8, 5, "decreasing")
    assert dec[0] == 16 and dec[-1] == 0 and sum(dec) == 40
    with pytest.raises(ValueError, match="constant"):
        tome.schedule(1, 2, "cubic")


def test_bad_inputs_name_the_problem():
    model = _vit()
    with pytest.raises(ValueError, match="4 blocks"):
        tome.apply(model, [1, 2])
    with pytest.raises(ValueError, match=r"r\[1\]"):
        tome.apply(model, [1, -1, 0, 0])
    with pytest.raises(TypeError, match="int"):
        tome.apply(model, 1.5)
    with pytest.raises(ValueError, match="blocks"):
        tome.apply(resnet_tiny_digits(), 2)
    assert not tome.is_applied(model)


def test_gradients_flow_through_merging():
    model = _vit().train()
    tome.apply(model, 4)
    model(torch.randn(4, 1, 8, 8)).sum().backward()
    assert model.blocks[0].attn.qkv.weight.grad is not None
    assert model.patch_embed.proj.weight.grad.abs().sum() > 0


def _timm():
    try:
        import timm
    except Exception as exc:  # timm imports torchvision, which fails to load on some installs
        pytest.skip(f"timm is not usable here: {exc}")
    return timm


def test_timm_vit_fused_and_unfused_attention():
    timm = _timm()
    torch.manual_seed(0)
    model = timm.create_model(
        "vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=10
    ).eval()
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        before = model(x)
        tome.apply(model, 0)
        assert torch.equal(model(x), before)
        tome.apply(model, 3)
        fused = model(x)
        for b in model.blocks:
            b.attn.fused_attn = False
        unfused = model(x)
    torch.testing.assert_close(fused, unfused, rtol=1e-4, atol=1e-4)


def test_works_with_sparse_linear_inside_the_blocks():
    from knsparse import nm_mask, swap_modules
    from knsparse.core.masks import apply_masks

    masked = _vit()
    masks = {
        n: nm_mask(m.weight.abs(), "2:4")
        for n, m in masked.named_modules()
        if n.startswith("blocks.") and isinstance(m, torch.nn.Linear)
    }
    apply_masks(masked, masks)
    swapped = _vit()
    swap_modules(swapped, masks)
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        plain = swapped(x)
        tome.apply(swapped, 0)
        assert torch.equal(swapped(x), plain)
        tome.apply(swapped, 4)
        tome.apply(masked, 4)
        torch.testing.assert_close(swapped(x), masked(x))
    assert type(swapped.blocks[0].attn.qkv).__name__ == "SparseLinear"
