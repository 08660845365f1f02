"""``nn.MultiheadAttention`` as plain Linear projections, so its GEMMs can be pruned and swapped.

``nn.MultiheadAttention`` keeps q/k/v in one ``in_proj_weight`` Parameter (or three
``{q,k,v}_proj_weight`` Parameters) that it feeds to ``F.multi_head_attention_forward``, and it
reads ``out_proj.weight`` directly instead of calling ``out_proj``: no Linear module runs, so a
k:n mask or a sparse module swapped in there is never used (swapping ``out_proj`` breaks
forward). :class:`LinearMultiheadAttention` computes the same function with four ``nn.Linear``
layers — ``q_proj``, ``k_proj``, ``v_proj`` ``[E, E_in]`` and ``out_proj`` ``[E, E]`` — and takes
the same ``forward`` arguments, so it drops in wherever the original was (torchvision's ViT
calls ``self_attention(x, x, x, need_weights=False)``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class LinearMultiheadAttention(nn.Module):
    """Multi-head attention with ``nn.Linear`` q/k/v and output projections.

    Shapes as ``nn.MultiheadAttention``: query ``[B, L, E]`` (``batch_first``) or ``[L, B, E]``,
    or unbatched ``[L, E]``; key/value likewise with ``S`` positions. Returns
    ``(output, weights)`` with weights ``[B, L, S]`` (averaged over heads), ``[B, H, L, S]``, or
    ``None`` when ``need_weights=False``.
    """

    # As nn.MultiheadAttention with separate projection weights: nn.Transformer*Layer probe these
    # to choose a fused fast path that reads the fused weights directly; these values keep them
    # on this module's forward.
    _qkv_same_embed_dim = False
    in_proj_weight = None
    in_proj_bias = None

    def __init__(
        self,
        embed_dim: int,
        num_heads: int,
        kdim: int,
        vdim: int,
        bias: bool,
        dropout: float,
        batch_first: bool,
    ) -> None:
        super().__init__()
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim={embed_dim} is not divisible by num_heads={num_heads}")
        self.embed_dim, self.num_heads, self.dropout, self.batch_first = (
            embed_dim,
            num_heads,
            dropout,
            batch_first,
        )
        self.head_dim = embed_dim // num_heads
        self.q_proj = nn.Linear(embed_dim, embed_dim, bias=bias)
        self.k_proj = nn.Linear(kdim, embed_dim, bias=bias)
        self.v_proj = nn.Linear(vdim, embed_dim, bias=bias)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias)

    @classmethod
    def from_mha(cls, mha: nn.MultiheadAttention, name: str = "") -> LinearMultiheadAttention:
        """The same function as ``mha`` (weights copied, same device/dtype); ``mha`` is unchanged.

        ``ValueError`` for the variants it does not reproduce (``add_bias_kv``, ``add_zero_attn``).
        """
        label = name or "the module"
        if not isinstance(mha, nn.MultiheadAttention):
            raise TypeError(f"{label} is a {type(mha).__name__}, not an nn.MultiheadAttention")
        if mha.bias_k is not None or mha.add_zero_attn:
            raise ValueError(f"{label}: add_bias_kv / add_zero_attn MultiheadAttention is not supported")
        bias = mha.in_proj_bias is not None
        new = cls(mha.embed_dim, mha.num_heads, mha.kdim, mha.vdim, bias, mha.dropout, mha.batch_first)
        e = mha.embed_dim
        if mha._qkv_same_embed_dim:
            weights = mha.in_proj_weight.detach().split(e)
        else:
            weights = (mha.q_proj_weight.detach(), mha.k_proj_weight.detach(), mha.v_proj_weight.detach())
        biases = mha.in_proj_bias.detach().split(e) if bias else (None, None, None)
        ref = mha.out_proj.weight
        new = new.to(device=ref.device, dtype=ref.dtype)
        with torch.no_grad():
            for lin, w, b in zip((new.q_proj, new.k_proj, new.v_proj), weights, biases, strict=True):
                lin.weight.copy_(w)
                if b is not None:
                    lin.bias.copy_(b)
            new.out_proj.weight.copy_(mha.out_proj.weight)
            if bias:
                new.out_proj.bias.copy_(mha.out_proj.bias)
        new.train(mha.training)
        return new

    def _mask(
        self,
        attn_mask: torch.Tensor | None,
        key_padding_mask: torch.Tensor | None,
        b: int,
        length: int,
        source: int,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """One additive float mask broadcastable to ``[B, H, L, S]`` (bool ``True`` = masked out)."""

        def additive(m: torch.Tensor) -> torch.Tensor:
            if m.dtype == torch.bool:
                return torch.zeros(m.shape, dtype=dtype, device=m.device).masked_fill(m, float("-inf"))
            return m.to(dtype)

        mask = None
        if attn_mask is not None:
            if attn_mask.dim() == 2:
                mask = additive(attn_mask).view(1, 1, length, source)
            else:  # [B * H, L, S]
                mask = additive(attn_mask).view(b, self.num_heads, length, source)
        if key_padding_mask is not None:
            pad = additive(key_padding_mask).view(b, 1, 1, source)
            mask = pad if mask is None else mask + pad
        return mask

    def forward(
        self,
        query: torch.Tensor,
        key: torch.Tensor,
        value: torch.Tensor,
        key_padding_mask: torch.Tensor | None = None,
        need_weights: bool = True,
        attn_mask: torch.Tensor | None = None,
        average_attn_weights: bool = True,
        is_causal: bool = False,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        if is_causal and attn_mask is None:
            raise ValueError("is_causal is a hint: pass the causal attn_mask too (as nn.MultiheadAttention)")
        unbatched = query.dim() == 2
        if unbatched:
            query, key, value = (t.unsqueeze(0) for t in (query, key, value))
            if key_padding_mask is not None:
                key_padding_mask = key_padding_mask.unsqueeze(0)
        elif not self.batch_first:
            query, key, value = (t.transpose(0, 1) for t in (query, key, value))
        b, length, _ = query.shape
        source = key.shape[1]

        def heads(t: torch.Tensor, n: int) -> torch.Tensor:  # [B, N, E] -> [B, H, N, D]
            return t.reshape(b, n, self.num_heads, self.head_dim).transpose(1, 2)

        q = heads(self.q_proj(query), length)
        k = heads(self.k_proj(key), source)
        v = heads(self.v_proj(value), source)
        mask = self._mask(attn_mask, key_padding_mask, b, length, source, q.dtype)
        p = self.dropout if self.training else 0.0
        weights = None
        if need_weights:
            scores = (q * (1.0 / math.sqrt(self.head_dim))) @ k.transpose(-2, -1)
            if mask is not None:
                scores = scores + mask
            attn = F.dropout(scores.softmax(dim=-1), p=p)
            out = attn @ v
            weights = attn.mean(dim=1) if average_attn_weights else attn
        else:
            out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p)
        out = self.out_proj(out.transpose(1, 2).reshape(b, length, self.embed_dim))
        if unbatched:
            out = out.squeeze(0)
            weights = None if weights is None else weights.squeeze(0)
        elif not self.batch_first:
            out = out.transpose(0, 1)
        return out, weights


def convert(model: nn.Module) -> list[str]:
    """Replace every ``nn.MultiheadAttention`` in ``model`` by a :class:`LinearMultiheadAttention`
    computing the same function; returns the converted module names.

    Every one is converted first and swapped in only when all succeeded (a ``ValueError``
    leaves ``model`` unchanged). The state-dict keys change: ``in_proj_weight`` becomes
    ``q_proj/k_proj/v_proj.weight``.
    """
    if isinstance(model, nn.MultiheadAttention):
        raise TypeError("model is itself an nn.MultiheadAttention: use LinearMultiheadAttention.from_mha")
    found = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    built = [(n, LinearMultiheadAttention.from_mha(m, n)) for n, m in found]
    for name, new in built:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, new)
    return [n for n, _ in built]
