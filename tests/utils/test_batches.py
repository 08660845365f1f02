"""Calibration batches: tensors, (x, y) tuples, mappings called as model(**batch), DataLoaders."""

from __future__ import annotations

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import knsparse as ks
from knsparse.pruning.repair import recalibrate_bn
from knsparse.utils.batches import Batch, model_batches, output_tensors


class _KeywordNet(nn.Module):
    """Takes ``pixel_values`` by keyword and returns a mapping, as Hugging Face models do."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(4, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, 4)

    def forward(self, pixel_values: torch.Tensor, labels: torch.Tensor | None = None) -> dict:
        logits = self.fc(self.bn(self.conv(pixel_values)).mean((2, 3)))
        return {"logits": logits}


class _DictSet(Dataset):
    def __init__(self, x: torch.Tensor) -> None:
        self.x = x

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict:
        return {"pixel_values": self.x[i], "labels": torch.tensor(i % 4)}


def test_every_batch_kind_becomes_one_model_call():
    x, y = torch.randn(6, 4, 5, 5), torch.arange(6)
    net = _KeywordNet().eval()
    as_kwargs = [b.kwargs["pixel_values"] for b in model_batches({"pixel_values": x})]
    assert len(as_kwargs) == 1 and as_kwargs[0] is x  # one mapping is one batch
    assert [b.args[0] for b in model_batches(x)] == [x]
    assert [b.args[0] is x for b in model_batches([(x, y), [x, y]])] == [True, True]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert [b.size for b in model_batches(loader)] == [4, 2]
    dict_loader = DataLoader(_DictSet(x), batch_size=4)
    batches = list(model_batches(dict_loader))
    assert [b.size for b in batches] == [4, 2] and set(batches[0].kwargs) == {"pixel_values", "labels"}
    assert torch.equal(batches[0](net)["logits"], net(pixel_values=x[:4])["logits"])
    (labelled,) = model_batches([({"pixel_values": x}, y)])
    assert labelled.args == () and labelled.kwargs["pixel_values"] is x
    assert Batch((x,)).to(None).args[0] is x


def test_output_tensors_reads_tensors_tuples_and_mappings():
    t = torch.ones(2)
    assert output_tensors(t)[0] is t
    assert output_tensors((t, None, 3)) == [t]
    assert output_tensors({"logits": t, "loss": None}) == [t]
    assert output_tensors("text") == []


def test_bad_batches_are_named():
    with pytest.raises(ValueError, match="no batches"):
        list(model_batches([]))
    with pytest.raises(TypeError, match="batch 1 holds no tensor"):
        list(model_batches([torch.ones(1), "image.png"]))
    with pytest.raises(TypeError, match="batch 0 is a mapping with no tensor"):
        list(model_batches([{"path": "a.png"}]))
    with pytest.raises(TypeError, match="calib must be"):
        list(model_batches(3))


def test_prune_permute_and_repair_read_mapping_batches_and_dataloaders():
    torch.manual_seed(0)
    x = torch.randn(8, 4, 6, 6)
    model = _KeywordNet().eval()
    for calib in (DataLoader(_DictSet(x), batch_size=4), [{"pixel_values": x}]):
        plan = ks.prune(
            model, method="cast", pattern="2:4", calib=calib, permute=True, repair="bn", progress=False
        )
        assert set(plan.masks) == {"conv", "fc"} and ks.is_nm(plan.model.fc.weight, "2:4")
        assert plan.repair.batches == (2 if isinstance(calib, DataLoader) else 1)
    assert recalibrate_bn(model, DataLoader(TensorDataset(x, torch.zeros(8)), batch_size=3)) == 3


@pytest.mark.parametrize(
    ("bad", "expected"),
    [
        (torch.randn(4, 3, 8, 8), r"calibration batch \d \(tensor \[4, 3, 8, 8\] float32\)"),
        (torch.randn(4, 1, 5, 5), r"calibration batch \d \(tensor \[4, 1, 5, 5\] float32\)"),
        (torch.randint(0, 10, (4,)), r"integer values: labels instead of images\?"),
    ],
)
def test_a_batch_the_model_cannot_run_is_named(bad, expected) -> None:
    """Wrong channel count, wrong image size, labels instead of images: one clear error naming the
    batch, what it holds and what the first layer takes; the model left as it was."""
    from knsparse.models import vit_tiny_digits

    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    calib = [torch.randn(4, 1, 8, 8), bad]
    for call in (
        lambda: ks.prune(model, "cast", "2:4", calib=calib, inplace=True, progress=False),
        lambda: ks.repair.recalibrate_bn(model, calib),
        lambda: ks.permute(model, "2:4", calib=[bad], max_iters=1),
    ):
        with pytest.raises(ValueError, match=expected) as err:
            call()
        assert "its first layer 'patch_embed.proj' takes [B, 1, H, W]" in str(err.value)
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
