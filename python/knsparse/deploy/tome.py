"""Token merging (ToMe, Bolya et al., ICLR 2023), written from the paper.

Inside every patched transformer block, between the attention and the MLP branch, ``r``
tokens are merged away:

1. the attention *keys*, averaged over heads, are the token features;
2. the tokens after the protected prefix (class token, register tokens) are split into two
   alternating sets A (even positions) and B (odd positions);
3. every A token is linked to its most cosine-similar B token; the ``r`` strongest links are
   kept and those A tokens are folded into their B partners as a size-weighted average;
4. each token carries its *size* (how many patches it stands for) and attention uses it:
   ``softmax(q kᵀ / √d + log size)`` (proportional attention), so a merged token weighs as
   much as the tokens it replaced.

``apply(model, r)`` patches the blocks of the built-in ViT and of timm ViTs in place (the
module tree, names and weights are untouched, so SparseLinear layers inside the blocks keep
working); ``remove(model)`` restores the original forward. With ``r = 0`` everywhere the
patched model runs exactly the original code path.
"""

from __future__ import annotations

import types
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from ..core.checks import check_ints, check_module, check_number
from ..integrations import families

_STATE_ATTR = "_knsparse_tome"


@dataclass
class _MergeState:
    """Shared by the patched blocks of one model during one forward pass."""

    num_protected: int
    # Token sizes ``[B, N, 1]`` (float32) once a block has merged; ``None`` means all ones.
    size: torch.Tensor | None = None
    blocks: list[nn.Module] = field(default_factory=list)


@dataclass(frozen=True)
class Matching:
    """Result of bipartite soft matching over ``T`` unprotected tokens, batch ``B``.

    ``src``: ``[B, r]`` indices into set A (even positions) of the tokens merged away.
    ``dst``: ``[B, r]`` indices into set B (odd positions) they are merged into.
    ``keep``: ``[B, |A| - r]`` indices into A of the tokens kept (most similar first).
    """

    src: torch.Tensor
    dst: torch.Tensor
    keep: torch.Tensor


def bipartite_soft_matching(metric: torch.Tensor, r: int) -> Matching:
    """Pick ``r`` tokens of set A to merge into their most similar token of set B.

    Args:
        metric: ``[B, T, C]`` token features (head-averaged keys) of the unprotected tokens.
        r: merges to make; at most ``T // 2``.

    Returns:
        A :class:`Matching`. Among exactly tied similarities the choice is unspecified.
    """
    # not check_tensor: MAC counting runs this on the meta device
    if not isinstance(metric, torch.Tensor) or metric.dim() != 3 or not metric.is_floating_point():
        is_tensor = isinstance(metric, torch.Tensor)
        got = f"{metric.dtype} {tuple(metric.shape)}" if is_tensor else type(metric).__name__
        raise TypeError(f"metric must be a floating [B, T, C] tensor, got {got}")
    check_number(r, "r", integer=True)
    t = metric.shape[1]
    if not 0 <= r <= t // 2:
        raise ValueError(f"r={r} merges need 0 <= r <= T // 2 = {t // 2} (T={t} tokens)")
    unit = F.normalize(metric.float(), dim=-1)
    a, b = unit[:, 0::2], unit[:, 1::2]
    best_sim, best_dst = (a @ b.transpose(1, 2)).max(dim=-1)
    # A full top-k is a plain sort that exports to ONNX (TopK); a stable sort does not.
    order = best_sim.topk(best_sim.shape[1], dim=-1).indices
    src = order[:, :r]
    return Matching(src=src, dst=best_dst.gather(1, src), keep=order[:, r:])


def merge_tokens(
    x: torch.Tensor, size: torch.Tensor, matching: Matching
) -> tuple[torch.Tensor, torch.Tensor]:
    """Size-weighted merge of the unprotected tokens.

    Args:
        x: ``[B, T, D]`` token values.
        size: ``[B, T, 1]`` float32 token sizes.
        matching: from :func:`bipartite_soft_matching` on the same ``T`` tokens.

    Returns:
        ``(x, size)`` with ``T - r`` tokens: the kept A tokens, then all B tokens
        (each the size-weighted mean of itself and what was merged into it). ``x`` keeps its
        dtype; the arithmetic runs in float32.
    """
    d = x.shape[-1]
    weighted = x.float() * size
    wa, wb = weighted[:, 0::2], weighted[:, 1::2]
    sa, sb = size[:, 0::2], size[:, 1::2]
    src_w = wa.gather(1, matching.src[..., None].expand(-1, -1, d))
    src_s = sa.gather(1, matching.src[..., None])
    wb = wb.scatter_add(1, matching.dst[..., None].expand(-1, -1, d), src_w)
    sb = sb.scatter_add(1, matching.dst[..., None], src_s)
    kept_w = wa.gather(1, matching.keep[..., None].expand(-1, -1, d))
    kept_s = sa.gather(1, matching.keep[..., None])
    new_size = torch.cat([kept_s, sb], dim=1)
    return (torch.cat([kept_w, wb], dim=1) / new_size).to(x.dtype), new_size


def _attention_with_sizes(
    attn: nn.Module, x: torch.Tensor, size: torch.Tensor | None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Self-attention with proportional attention; returns ``(output, head-averaged keys)``."""
    b, n, _ = x.shape
    heads, head_dim = attn.num_heads, attn.head_dim
    qkv = attn.qkv(x).reshape(b, n, 3, heads, head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    if hasattr(attn, "q_norm"):
        q, k = attn.q_norm(q), attn.k_norm(k)
    bias = None if size is None else size.log().to(q.dtype).reshape(b, 1, 1, n)
    drop = getattr(attn, "attn_drop", None)
    if getattr(attn, "fused_attn", False):
        p = drop.p if (drop is not None and attn.training) else 0.0
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias, dropout_p=p)
    else:
        scores = (q * attn.scale) @ k.transpose(-2, -1)
        if bias is not None:
            scores = scores + bias
        weights = scores.softmax(dim=-1)
        if drop is not None:
            weights = drop(weights)
        out = weights @ v
    out = out.transpose(1, 2).reshape(b, n, heads * head_dim)
    if hasattr(attn, "norm"):
        out = attn.norm(out)
    out = attn.proj(out)
    if hasattr(attn, "proj_drop"):
        out = attn.proj_drop(out)
    return out, k.mean(dim=1)


def _apply_if_present(module: nn.Module, name: str, x: torch.Tensor) -> torch.Tensor:
    """``module.<name>(x)`` for timm's optional sub-layers (LayerScale, DropPath); else ``x``."""
    layer = getattr(module, name, None)
    return x if layer is None else layer(x)


def _merging_block_forward(self: nn.Module, x: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
    """Block forward with proportional attention and ``self._knsparse_tome_r`` merges.

    ``x``: ``[B, N, D]`` → ``[B, N - r', D]`` with ``r' = min(r, (N - protected) // 2)``.
    """
    state: _MergeState = getattr(self, _STATE_ATTR)
    if self is state.blocks[0]:
        state.size = None
    r = self._knsparse_tome_r
    if state.size is None and r == 0:
        return type(self).forward(self, x, *args, **kwargs)
    if any(a is not None and a is not False for a in (*args, *kwargs.values())):
        raise ValueError("token merging changes the token count, so it cannot take an attention mask")
    attn_out, keys = _attention_with_sizes(self.attn, self.norm1(x), state.size)
    x = x + _apply_if_present(self, "drop_path1", _apply_if_present(self, "ls1", attn_out))
    p = state.num_protected
    r = min(r, (x.shape[1] - p) // 2)
    if r > 0:
        size = state.size
        if size is None:
            size = torch.ones(x.shape[0], x.shape[1], 1, device=x.device)
        matching = bipartite_soft_matching(keys[:, p:], r)
        merged, merged_size = merge_tokens(x[:, p:], size[:, p:], matching)
        x = torch.cat([x[:, :p], merged], dim=1)
        state.size = torch.cat([size[:, :p], merged_size], dim=1)
    mlp_out = self.mlp(self.norm2(x))
    return x + _apply_if_present(self, "drop_path2", _apply_if_present(self, "ls2", mlp_out))


def _check_attention(name: str, attn: nn.Module) -> None:
    if families.attention_parts(attn, windowed=False) is None:
        cls = type(attn)
        raise ValueError(
            f"block {name!r}: attention class {cls.__module__}.{cls.__name__} is not supported by "
            f"token merging (supported: {families.known_classes('attention')})"
        )
    if getattr(attn, "gate", None) is not None:
        raise ValueError(f"block {name!r}: gated timm attention is not supported by token merging")


def _vit_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential) or len(blocks) == 0:
        raise ValueError(
            f"{type(model).__name__} has no 'blocks' nn.Sequential of transformer blocks; token "
            "merging supports the built-in VisionTransformer and timm VisionTransformer models"
        )
    out = []
    for i, block in enumerate(blocks):
        name = f"blocks.{i}"
        if not families.is_vit_block(block):
            cls = type(block)
            raise ValueError(
                f"block {name!r} is a {cls.__module__}.{cls.__name__}; token merging supports the "
                f"pre-norm ViT blocks {families.known_classes('vit_block')}"
            )
        _check_attention(name, block.attn)
        out.append((name, block))
    return out


def _num_protected(model: nn.Module) -> int:
    if hasattr(model, "num_prefix_tokens"):
        return int(model.num_prefix_tokens)
    return int(getattr(model, "cls_token", None) is not None)


def _check_pooling(model: nn.Module) -> None:
    pool = getattr(model, "global_pool", "token")
    if pool not in ("token", "") or getattr(model, "attn_pool", None) is not None:
        raise ValueError(
            f"{type(model).__name__} pools its tokens with global_pool={pool!r}; token merging "
            "supports class-token pooling only (merged tokens would be averaged without their sizes)"
        )


def schedule(r: int, depth: int, kind: str = "constant") -> list[int]:
    """Per-block merge counts: ``"constant"`` (``r`` in every block) or ``"decreasing"``
    (linear from ``2r`` in the first block to 0 in the last, about ``r * depth`` in total)."""
    check_number(r, "r", low=0, integer=True)
    check_number(depth, "depth", low=1, integer=True)
    if kind == "constant":
        return [r] * depth
    if kind == "decreasing":
        if depth == 1:
            return [r]
        return [round(2 * r * (depth - 1 - i) / (depth - 1)) for i in range(depth)]
    raise ValueError(f"schedule kind must be 'constant' or 'decreasing', got {kind!r}")


def merge_schedule(model: nn.Module, r: int | Sequence[int], arg: str = "r") -> list[int]:
    """The merges per block that ``r`` asks of ``model`` (``arg`` names it in errors): an int
    for every block or one int >= 0 per block; ``[]`` for no merges (any model)."""
    check_module(model)
    if isinstance(r, bool) or not isinstance(r, (int, Sequence)) or isinstance(r, str):
        raise TypeError(f"{arg} must be an int or a sequence of ints, got {type(r).__name__} {r!r}")
    if isinstance(r, int):
        check_number(r, arg, low=0, integer=True)
    else:
        check_ints(r, arg, low=0)
    if r == 0 or (not isinstance(r, int) and not any(r)):
        return []
    depth = len(_vit_blocks(model))
    per_block = [r] * depth if isinstance(r, int) else list(r)
    if len(per_block) != depth:
        raise ValueError(f"{arg} has {len(per_block)} entries but the model has {depth} blocks")
    return per_block


def is_applied(model: nn.Module) -> bool:
    """True if :func:`apply` has patched ``model``."""
    check_module(model)
    blocks = getattr(model, "blocks", None)
    return isinstance(blocks, nn.Sequential) and any(hasattr(b, _STATE_ATTR) for b in blocks)


def apply(model: nn.Module, r: int | Sequence[int]) -> nn.Module:
    """Patch ``model``'s transformer blocks in place to merge ``r`` tokens per block.

    Args:
        model: a built-in ``VisionTransformer`` or a timm ``VisionTransformer`` with
            class-token pooling. Linear layers inside the blocks may be SparseLinear.
        r: merges per block (an int for every block, or one int per block; see
            :func:`schedule`). Each block merges at most half of its unprotected tokens.

    Returns:
        ``model`` itself. Applying again replaces the schedule; :func:`remove` undoes it.
    """
    check_module(model)
    blocks = _vit_blocks(model)
    per_block = merge_schedule(model, r) or [0] * len(blocks)
    _check_pooling(model)
    remove(model)
    state = _MergeState(num_protected=_num_protected(model), blocks=[b for _, b in blocks])
    for (_, block), block_r in zip(blocks, per_block, strict=True):
        setattr(block, _STATE_ATTR, state)
        block._knsparse_tome_r = block_r
        block.forward = types.MethodType(_merging_block_forward, block)
    return model


def remove(model: nn.Module) -> nn.Module:
    """Undo :func:`apply` (a no-op on an unpatched model); returns ``model``."""
    check_module(model)
    blocks = getattr(model, "blocks", None)
    if not isinstance(blocks, nn.Sequential):
        return model
    for block in blocks:
        if hasattr(block, _STATE_ATTR):
            for attr in (_STATE_ATTR, "_knsparse_tome_r", "forward"):
                delattr(block, attr)
    return model


def merges_per_block(model: nn.Module) -> list[int]:
    """The patched ``r`` of every block (all zeros if the model is not patched)."""
    check_module(model)
    return [getattr(b, "_knsparse_tome_r", 0) for b in getattr(model, "blocks", [])]


def token_counts(num_tokens: int, r: Sequence[int], num_protected: int = 1) -> list[int]:
    """Tokens entering each block when ``num_tokens`` enter the first: ``len(r) + 1`` counts."""
    check_number(num_tokens, "num_tokens", low=1, integer=True)
    check_ints(r, "r", low=0)
    check_number(num_protected, "num_protected", low=0, integer=True)
    counts = [num_tokens]
    for block_r in r:
        n = counts[-1]
        counts.append(n - min(block_r, max(n - num_protected, 0) // 2))
    return counts
