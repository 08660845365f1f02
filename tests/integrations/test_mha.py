"""nn.MultiheadAttention -> LinearMultiheadAttention: the same function (<= 1e-5 fp32), prunable."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from knsparse.core.layers import prunable_layers
from knsparse.integrations import mha

TOL = 1e-5


def _mha(batch_first: bool, **kw) -> nn.MultiheadAttention:
    torch.manual_seed(0)
    m = nn.MultiheadAttention(32, 4, batch_first=batch_first, **kw)
    with torch.no_grad():  # torch zero-initialises the biases: make them count
        for name, p in m.named_parameters():
            if "bias" in name:
                p.normal_()
    return m.eval()


def _close(a, b) -> None:
    if a is None or b is None:
        assert a is None and b is None
        return
    assert a.shape == b.shape
    torch.testing.assert_close(a, b, rtol=0, atol=TOL)


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("need_weights", [True, False])
@pytest.mark.parametrize("average", [True, False])
def test_self_attention_matches(batch_first, need_weights, average):
    ref = _mha(batch_first)
    new = mha.LinearMultiheadAttention.from_mha(ref)
    x = torch.randn(3, 7, 32) if batch_first else torch.randn(7, 3, 32)
    with torch.no_grad():
        want = ref(x, x, x, need_weights=need_weights, average_attn_weights=average)
        got = new(x, x, x, need_weights=need_weights, average_attn_weights=average)
    _close(got[0], want[0])
    _close(got[1], want[1])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("mask_kind", ["bool", "float"])
@pytest.mark.parametrize("need_weights", [True, False])
def test_masks_and_cross_attention_with_other_kv_dims(batch_first, mask_kind, need_weights):
    ref = _mha(batch_first, kdim=24, vdim=40)
    new = mha.LinearMultiheadAttention.from_mha(ref)
    b, length, source = 2, 5, 6
    shape = (b, length) if batch_first else (length, b)
    q = torch.randn(*shape, 32)
    k = torch.randn(*(shape[0], source) if batch_first else (source, b), 24)
    v = torch.randn(*(shape[0], source) if batch_first else (source, b), 40)
    pad = torch.zeros(b, source, dtype=torch.bool)
    pad[0, -2:] = True
    causal = torch.ones(length, source, dtype=torch.bool).triu(1)
    per_head = torch.rand(b * 4, length, source) < 0.3
    per_head[..., 0] = False  # no fully masked row
    if mask_kind == "float":
        pad, causal, per_head = (torch.zeros(m.shape).masked_fill(m, -1e4) for m in (pad, causal, per_head))
    for attn_mask in (causal, per_head):
        kw = dict(key_padding_mask=pad, attn_mask=attn_mask, need_weights=need_weights)
        with torch.no_grad():
            want, got = ref(q, k, v, **kw), new(q, k, v, **kw)
        _close(got[0], want[0])
        _close(got[1], want[1])


def test_unbatched_input_and_training_mode_flag():
    ref = _mha(True)
    new = mha.LinearMultiheadAttention.from_mha(ref)
    x = torch.randn(5, 32)
    with torch.no_grad():
        _close(new(x, x, x)[0], ref(x, x, x)[0])
        _close(new(x, x, x)[1], ref(x, x, x)[1])
    assert not new.training


def test_convert_replaces_every_mha_and_makes_its_projections_prunable():
    torch.manual_seed(0)
    model = nn.TransformerEncoder(
        nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True), 2, enable_nested_tensor=False
    ).eval()
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        want = model(x)
    names = mha.convert(model)
    assert names == ["layers.0.self_attn", "layers.1.self_attn"]
    assert not any(isinstance(m, nn.MultiheadAttention) for m in model.modules())
    with torch.no_grad():
        _close(model(x), want)
    layers = prunable_layers(model)
    for n in names:
        assert {f"{n}.{p}" for p in ("q_proj", "k_proj", "v_proj", "out_proj")} <= set(layers)
    # Pruning q_proj now changes the output: the Linear really runs.
    with torch.no_grad():
        model.layers[0].self_attn.q_proj.weight.zero_()
        assert (model(x) - want).abs().max() > 1e-3


def test_unsupported_variants_leave_the_model_unchanged():
    model = nn.Sequential(nn.MultiheadAttention(8, 2), nn.MultiheadAttention(8, 2, add_bias_kv=True))
    before = list(model)
    with pytest.raises(ValueError, match=r"^1: add_bias_kv"):
        mha.convert(model)
    assert list(model) == before
    with pytest.raises(TypeError, match="itself"):
        mha.convert(nn.MultiheadAttention(8, 2))
    with pytest.raises(TypeError, match="not an nn.MultiheadAttention"):
        mha.LinearMultiheadAttention.from_mha(nn.Linear(8, 8), "x")
