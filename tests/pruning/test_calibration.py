import pytest
import torch
import torch.nn.functional as F
from torch import nn

from knsparse.core.masks import from_reduction_view, to_reduction_view
from knsparse.pruning.calibration import (
    check_reiterable,
    collect_input_stats,
    data_path_budgets,
    gemm_input_rows,
    stream_layer_inputs,
)


@pytest.mark.parametrize("conv_order", ["rsc", "crs"])
@pytest.mark.parametrize(
    "conv",
    [
        nn.Conv2d(8, 6, 3, padding=1, bias=False),
        nn.Conv2d(8, 6, 3, stride=2, dilation=2, padding=2, bias=False),
        nn.Conv2d(8, 6, (1, 3), padding="same", bias=False),
        nn.Conv2d(8, 6, 3, padding=1, padding_mode="reflect", bias=False),
        nn.Conv2d(8, 6, 1, bias=False),
    ],
)
def test_conv_rows_times_reduction_weight_is_the_conv(conv, conv_order):
    x = torch.randn(2, 8, 9, 7)
    rows = gemm_input_rows(conv, x, conv_order)
    y = conv(x)
    gemm = rows @ to_reduction_view(conv.weight.detach(), conv_order).T  # [B, L, Cout]
    assert torch.allclose(gemm.transpose(1, 2).reshape(y.shape), y, atol=1e-5)


def test_linear_rows_keep_tokens_per_sample():
    lin = nn.Linear(5, 3)
    assert gemm_input_rows(lin, torch.randn(4, 7, 5)).shape == (4, 7, 5)
    assert gemm_input_rows(lin, torch.randn(4, 5)).shape == (4, 1, 5)


class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.fc = nn.Linear(8 * 16, 8)
        self.dropout = nn.Dropout(0.5)

    def forward(self, x):
        return self.fc(self.dropout(torch.relu(self.conv(x)).flatten(1)))


def test_streamed_stats_equal_one_big_batch_and_stay_bounded():
    torch.manual_seed(0)
    model = Tiny()
    batches = [torch.randn(3, 4, 4, 4) for _ in range(4)]
    layers = {"conv": model.conv, "fc": model.fc}
    streamed = collect_input_stats(model, layers, batches, group=4)
    whole = collect_input_stats(model, layers, [torch.cat(batches)], group=4)
    for name, mod in layers.items():
        rows = gemm_input_rows(mod, _inputs_of(model, mod, torch.cat(batches))).reshape(
            -1, streamed[name].sum_sq.numel()
        )
        assert streamed[name].samples == 12
        assert torch.allclose(streamed[name].sum_sq, whole[name].sum_sq)
        assert torch.allclose(streamed[name].sum_sq.float(), rows.square().sum(0), rtol=1e-5)
        blocks = rows.reshape(rows.shape[0], -1, 4)
        assert torch.allclose(
            streamed[name].block_gram.float(),
            torch.einsum("tgi,tgj->gij", blocks, blocks),
            rtol=1e-4,
            atol=1e-4,
        )
        k = rows.shape[1]
        assert streamed[name].block_gram.shape == (k // 4, 4, 4)
        assert torch.allclose(streamed[name].column_norms(), (rows.square().sum(0) / 12).sqrt(), rtol=1e-5)


@pytest.mark.parametrize("kind", ["sum_sq only", "block gram", "full gram"])
def test_column_squares_follow_the_inputs_whatever_is_collected(kind):
    # The squares are read off a Gram's diagonal when one is collected; finite inputs whose
    # float32 squares overflow are still summed exactly, and NaN/Inf inputs are refused.
    lin = nn.Linear(8, 2)
    options = {"sum_sq only": {}, "block gram": {"group": 4}, "full gram": {"full_gram": True}}[kind]
    x = torch.randn(6, 8, generator=torch.Generator().manual_seed(0))
    got = collect_input_stats(lin, {"": lin}, [x[:3], x[3:]], **options)[""]
    assert torch.allclose(got.sum_sq, x.double().square().sum(0), rtol=1e-5)
    huge = x.clone()
    huge[0, 2] = 3e20  # finite, but its float32 square is inf
    got = collect_input_stats(lin, {"": lin}, [huge], **options)[""]
    assert torch.isfinite(got.sum_sq).all()
    assert got.sum_sq[2] == pytest.approx(float(huge[:, 2].double().square().sum()), rel=1e-6)
    for bad in (float("nan"), float("inf")):
        broken = x.clone()
        broken[4, 5] = bad
        with pytest.raises(ValueError, match=r"layer ''.*NaN or Inf"):
            collect_input_stats(lin, {"": lin}, [x[:3], broken[3:]], **options)


def _inputs_of(model, module, x):
    seen = []
    handle = module.register_forward_pre_hook(lambda _m, inp: seen.append(inp[0]))
    model.eval()
    with torch.no_grad():
        model(x)
    handle.remove()
    return seen[0]


def test_stream_restores_training_flag_and_removes_hooks():
    model = Tiny().train()
    calls = []
    n = stream_layer_inputs(
        model,
        {"fc": model.fc},
        [(torch.randn(2, 4, 4, 4), torch.zeros(2))],
        lambda name, rows: calls.append((name, rows.shape)),
    )
    assert n == 1 and calls == [("fc", (2, 1, 128))]
    assert model.training
    assert not model.fc._forward_pre_hooks
    with pytest.raises(ValueError, match="no batches"):
        stream_layer_inputs(model, {"fc": model.fc}, [], lambda *_: None)
    assert not model.fc._forward_pre_hooks


def test_one_shot_iterators_are_refused():
    with pytest.raises(ValueError, match="one-shot"):
        check_reiterable(iter([torch.zeros(1)]))
    with pytest.raises(ValueError, match="one-shot"):
        check_reiterable(x for x in [torch.zeros(1)])
    with pytest.raises(ValueError, match="iterable"):
        check_reiterable(3)
    check_reiterable([torch.zeros(1)])


def test_data_path_budget_matches_brute_force():
    torch.manual_seed(1)
    model = Tiny()
    batches = [torch.randn(5, 4, 4, 4) for _ in range(2)]
    r_fc = torch.randn(8, 128) * (torch.rand(8, 128) < 0.3)
    r_conv = torch.randn(8, 36) * 0.1
    got = data_path_budgets(
        model,
        {"conv": model.conv, "fc": model.fc},
        batches,
        {"fc": r_fc, "conv": r_conv},
        lipschitz={"fc": 0.5},
    )
    x = torch.cat(batches)
    feats = _inputs_of(model, model.fc, x)
    expect_fc = 2 * 0.5 * (feats @ r_fc.T).abs().amax(1).mean()
    conv_change = F.conv2d(x, from_reduction_view(r_conv, (8, 4, 3, 3)), padding=1)
    expect_conv = 2 * conv_change.abs().flatten(1).amax(1).mean()
    assert got["fc"] == pytest.approx(float(expect_fc), rel=1e-5)
    assert got["conv"] == pytest.approx(float(expect_conv), rel=1e-5)
