"""ks.finetune on one process: masks held under AdamW, data forms, checkpoint + resume, errors."""

from __future__ import annotations

import copy
import itertools
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset
from untouched import assert_same, snapshot

import knsparse as ks
from knsparse.core.layers import masks_from_zeros
from knsparse.pruning.finetune import distillation_loss, warmup_cosine


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(16, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(torch.relu(self.fc1(x)))


class DictData(Dataset):
    """Hugging Face style items: ``{"x": ..., "labels": ...}`` (the model takes ``x=``)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {"x": self.x[i], "labels": self.y[i]}


def setup(seed: int = 0) -> tuple[Net, Net, dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    torch.manual_seed(seed)
    teacher = Net()
    student = copy.deepcopy(teacher)
    masks = ks.prune(student, "magnitude", "2:4", inplace=True, progress=False).masks
    x = torch.randn(96, 16)
    return teacher, student, masks, x, teacher(x).argmax(-1).detach()


def test_masks_hold_under_weight_decay_and_student_learns() -> None:
    teacher, student, masks, x, y = setup()
    before = distillation_loss(student(x), teacher(x), 2.0).item()
    result = ks.finetune(
        student,
        teacher,
        (x, y),
        epochs=4,
        plan=masks,
        batch_size=16,
        lr=3e-3,
        weight_decay=0.5,
        progress=False,
    )
    for name, mask in masks.items():
        w = student.get_submodule(name).weight
        assert torch.all(w[~mask] == 0) and ks.is_nm(w, "2:4"), name
    after = distillation_loss(student(x), teacher(x), 2.0).item()
    assert after < 0.7 * before
    assert [m["epoch"] for m in result.metrics] == [1, 2, 3, 4]
    assert result.metrics[-1]["lr"] == pytest.approx(0.0, abs=1e-12)  # the cosine ends at zero
    assert result.metrics[0]["images"] == 96


def test_data_forms_agree() -> None:
    """A tensor, an (x, y) tuple, a Dataset of dicts (``model(x=...)``) and a DataLoader see
    the same batches."""
    weights = []
    for make in (
        lambda x, y: x,
        lambda x, y: (x, y),
        lambda x, y: DictData(x, y),
        lambda x, y: DataLoader(DictData(x, y), batch_size=16),
    ):
        teacher, student, masks, x, y = setup()
        ks.finetune(student, teacher, make(x, y), epochs=1, plan=masks, batch_size=16, progress=False)
        weights.append(student.fc1.weight.detach().clone())
    for w in weights[1:]:
        torch.testing.assert_close(w, weights[0])


def test_checkpoint_resume_equals_one_run(tmp_path: Path) -> None:
    teacher, student, masks, x, y = setup()
    kwargs = {"plan": masks, "batch_size": 16, "label_weight": 0.3, "progress": False}
    ks.finetune(student, teacher, (x, y), epochs=3, checkpoint_dir=tmp_path, **kwargs)
    latest = json.loads((tmp_path / "latest.json").read_text())
    assert latest["epoch"] == 3 and all((tmp_path / f"epoch{e}.safetensors").is_file() for e in (1, 2, 3))
    # the job as it was had it died during epoch 2: latest.json still named epoch 1
    latest.update(
        epoch=1, weights="epoch1.safetensors", trainer="epoch1.trainer.pt", metrics=latest["metrics"][:1]
    )
    (tmp_path / "latest.json").write_text(json.dumps(latest))
    resumed = setup()[1]  # a fresh process: weights, optimiser and schedule come from the files
    metrics = tmp_path / "m.json"
    result = ks.finetune(
        resumed,
        teacher,
        (x, y),
        epochs=3,
        checkpoint_dir=tmp_path,
        resume=True,
        metrics_path=metrics,
        **kwargs,
    )
    assert result.resumed_from == 1 and len(result.metrics) == 3
    torch.testing.assert_close(resumed.state_dict(), student.state_dict())
    assert len(json.loads(metrics.read_text())["epochs"]) == 3


def test_masks_default_to_the_zeros() -> None:
    _, student, masks, _, _ = setup()
    found = masks_from_zeros(student)
    assert set(found) == set(masks) and all(torch.equal(found[n], masks[n]) for n in masks)


def test_warmup_cosine() -> None:
    factors = [warmup_cosine(s, 10, 2) for s in range(10)]
    assert factors[:3] == [0.5, 1.0, 1.0] and factors[-1] > 0 and warmup_cosine(10, 10, 2) == 0.0
    assert all(a >= b for a, b in itertools.pairwise(factors[1:]))


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"plan": {"nope": torch.ones(1, dtype=torch.bool)}}, "nope"),
        ({"plan": {"fc1": torch.ones(3, 3, dtype=torch.bool)}}, "fc1"),
        ({"label_weight": 1.5}, "label_weight"),
        ({"amp": "fp16"}, "CUDA"),
        ({"batch_size": 16, "epochs": 0}, "epochs"),
        ({"resume": True}, "checkpoint_dir"),
    ],
)
def test_bad_arguments_leave_the_student_alone(change: dict, message: str) -> None:
    teacher, student, _, x, y = setup()
    before = copy.deepcopy(student.state_dict())
    with pytest.raises(ValueError, match=message):
        ks.finetune(student, teacher, (x, y), **{"epochs": 1, "progress": False, **change})
    torch.testing.assert_close(student.state_dict(), before, rtol=0, atol=0)


def test_bad_data() -> None:
    teacher, student, _, x, _ = setup()
    with pytest.raises(TypeError, match="data"):
        ks.finetune(student, teacher, 3, epochs=1, progress=False)
    with pytest.raises(ValueError, match="differ in length"):
        ks.finetune(student, teacher, (x, torch.zeros(5)), epochs=1, progress=False)
    with pytest.raises(ValueError, match="needs labels"):
        ks.finetune(student, teacher, x, epochs=1, label_weight=0.5, progress=False)
    with pytest.raises(ValueError, match="separate"):
        ks.finetune(student, student, x, epochs=1, progress=False)


@pytest.mark.gpu
def test_mixed_precision_on_cuda() -> None:
    teacher, student, masks, x, y = setup()
    teacher, student = teacher.cuda(), student.cuda()
    for amp in ("bf16", "fp16"):
        ks.finetune(student, teacher, (x.cuda(), y.cuda()), epochs=1, plan=masks, amp=amp, progress=False)
        for name, mask in masks.items():
            assert torch.all(student.get_submodule(name).weight[~mask.cuda()] == 0), (amp, name)


def test_a_batch_the_models_cannot_run_fails_before_training() -> None:
    """A validation (or training) set of the wrong width is found on its first batch, naming it,
    before the student changes (before: torch's shape error after the first epoch)."""
    teacher, student, _, x, y = setup()
    student.fc1.eval()
    snap = snapshot(student)
    for kwargs in ({"val": torch.randn(8, 3)}, {"data": (torch.randn(96, 7), y)}):
        call = {"data": (x, y), "epochs": 1, "progress": False, **kwargs}
        with pytest.raises(ValueError, match=f"{next(iter(kwargs))} batch 0"):
            ks.finetune(student, teacher, **call)
        assert_same(snap, snapshot(student))


def test_training_flags_come_back_module_by_module() -> None:
    teacher, student, _, x, y = setup()
    student.train()
    student.fc2.eval()  # a frozen head inside a training model stays frozen
    teacher.fc1.train()

    def flags() -> list[dict[str, bool]]:
        return [{n: m.training for n, m in model.named_modules()} for model in (student, teacher)]

    before = flags()
    ks.finetune(student, teacher, (x, y), epochs=1, val=(x, y), progress=False)
    assert flags() == before


def test_freeze_norm_keeps_the_running_statistics_and_trains_the_affine() -> None:
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.BatchNorm1d(32), nn.ReLU(), nn.Linear(32, 5)).eval()
    for frozen in (True, False):
        student = copy.deepcopy(teacher)
        masks = ks.prune(student, "magnitude", "2:4", inplace=True, progress=False).masks
        stats = (student[1].running_mean.clone(), student[1].running_var.clone(), student[1].weight.clone())
        x = torch.randn(64, 16) * 3 + 1  # batch statistics far from the running ones
        ks.finetune(
            student, teacher, x, epochs=2, plan=masks, batch_size=16, progress=False, freeze_norm=frozen
        )
        kept = torch.equal(student[1].running_mean, stats[0]) and torch.equal(
            student[1].running_var, stats[1]
        )
        assert kept == frozen
        assert not torch.equal(student[1].weight, stats[2])  # the affine weight trains either way
        assert not student.training  # the modes the student came with
