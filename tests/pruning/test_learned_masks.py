"""Learned k:n masks in ks.finetune (issue 25 item 3): candidates, the prior, hard k:n results,
equal-step comparison with fixed masks, permuted dense values, resume, and refusals."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.nn.utils import parametrize
from untouched import assert_same, snapshot

import knsparse as ks
from knsparse.core.masks import apply_masks, nm_mask, nm_violation
from knsparse.core.pattern import Pattern
from knsparse.core.plan import SparsityPlan
from knsparse.pruning.finetune import MaskLearning, distillation_loss
from knsparse.pruning.learned_masks import SoftKN, candidate_masks, dense_weights


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2, self.fc3 = nn.Linear(16, 32), nn.Linear(32, 32), nn.Linear(32, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(torch.relu(self.fc2(torch.relu(self.fc1(x)))))


def _pruned(seed: int = 0, worst: bool = False) -> tuple[Net, Net, SparsityPlan, torch.Tensor]:
    """Teacher, 2:4 student and its plan; ``worst``: each group keeps its two smallest weights."""
    torch.manual_seed(seed)
    teacher = Net().eval()
    x = torch.randn(128, 16)
    result = ks.prune(teacher, "magnitude", "2:4", progress=False)
    plan = result.plan
    if worst:
        masks = {n: nm_mask(-teacher.get_submodule(n).weight.abs(), "2:4") for n in plan.masks}
        plan = SparsityPlan(plan.pattern, masks)
        student = copy.deepcopy(teacher)
        apply_masks(student, masks)
    else:
        student = result.model
    return teacher, student, plan, x


def test_candidates_are_every_k_of_n() -> None:
    two_four = candidate_masks(Pattern.parse("2:4"))
    assert two_four.shape == (6, 4) and bool((two_four.sum(1) == 2).all())
    assert len({tuple(r.tolist()) for r in two_four}) == 6
    assert candidate_masks(Pattern.parse("4:8")).shape == (70, 8)
    with pytest.raises(ValueError, match="8:16 has 12870"):
        candidate_masks(Pattern.parse("8:16"))


@pytest.mark.parametrize("pattern", ["2:4", "2:4/crs", "4:8"])
def test_the_prior_is_the_hard_mask_at_the_start(pattern: str) -> None:
    torch.manual_seed(0)
    shape = (8, 16) if pattern == "4:8" else (8, 8, 3, 3)
    prior = nm_mask(torch.randn(shape), pattern)
    prior.view(-1)[:8] = False  # some groups keep fewer than k: the prior is a superset of them
    soft = SoftKN(prior, Pattern.parse(pattern), strength=3.0).eval()
    hard = soft.hard_mask()
    assert nm_violation(hard, Pattern.parse(pattern)) is None
    assert bool(hard[prior].all())  # every entry the prior keeps is kept
    assert torch.equal(soft.mask().bool(), hard)
    # in training the mask is soft: every candidate weight is in [0, 1] and each group sums to k
    soft.train()
    m = soft.mask()
    assert bool(((m >= 0) & (m <= 1)).all())
    kn = Pattern.parse(pattern)
    torch.testing.assert_close(m.sum(), torch.tensor(float(kn.k * m.numel() // kn.n)))


def test_learned_masks_are_hard_k_n_and_the_plan_follows() -> None:
    teacher, student, plan, x = _pruned()
    keys = set(student.state_dict())
    result = ks.finetune(
        student, teacher, x, epochs=3, plan=plan, batch_size=16, lr=3e-3, progress=False, learn_masks=True
    )
    assert set(student.state_dict()) == keys
    assert not any(parametrize.is_parametrized(m) for m in student.modules())
    assert result.plan is not None and result.plan.pattern == plan.pattern
    assert set(result.plan.masks) == set(plan.masks)
    for name, mask in result.masks.items():
        w = student.get_submodule(name).weight
        assert nm_violation(mask, plan.pattern) is None, name
        assert torch.equal(result.plan.masks[name], mask)
        assert bool((w[~mask] == 0).all()) and ks.is_nm(w, "2:4"), name


def test_learned_masks_leave_a_bad_prior_that_fixed_masks_keep() -> None:
    """From the worst 2:4 mask, equal steps: learning moves masks and ends with a lower
    distillation loss than holding them fixed."""
    losses, moved = {}, 0
    for learn in (False, MaskLearning(lr=0.2)):
        teacher, student, plan, x = _pruned(worst=True)
        result = ks.finetune(
            student,
            teacher,
            x,
            epochs=8,
            plan=plan,
            batch_size=16,
            lr=3e-3,
            progress=False,
            learn_masks=learn,
        )
        with torch.no_grad():
            losses[bool(learn)] = distillation_loss(student(x), teacher(x), 2.0).item()
        if learn:
            moved = sum(int((result.masks[n] != plan.masks[n]).sum()) for n in plan.masks)
    assert moved > 0
    assert losses[True] < 0.8 * losses[False]


def test_pruned_entries_restart_at_the_permuted_dense_values() -> None:
    """With prune(permute=True) the student's channels are permuted; the dense value of each of
    its entries is the teacher's, permuted as the plan records (magnitude keeps values)."""
    torch.manual_seed(1)
    teacher = Net().eval()
    x = torch.randn(64, 16)
    result = ks.prune(teacher, "magnitude", "2:4", calib=[x], permute=True, progress=False)
    assert result.plan.permutation
    modules = dict(result.model.named_modules())
    shapes = {n: modules[n].weight.shape for n in result.plan.masks}
    dense = dense_weights(teacher, sorted(shapes), shapes, result.plan.permutation)
    for name, mask in result.plan.masks.items():
        torch.testing.assert_close(dense[name][mask], modules[name].weight[mask], rtol=0, atol=0)
    # without the permutation some kept entries would not match: the records matter
    plain = dense_weights(teacher, sorted(shapes), shapes)
    assert any(not torch.equal(plain[n][m], modules[n].weight[m]) for n, m in result.plan.masks.items())


def test_resume_equals_one_run(tmp_path: Path) -> None:
    teacher, student, plan, x = _pruned()
    kwargs = {"plan": plan, "batch_size": 32, "progress": False, "learn_masks": MaskLearning(lr=0.2)}
    whole = ks.finetune(student, teacher, x, epochs=2, checkpoint_dir=tmp_path, **kwargs)
    latest = json.loads((tmp_path / "latest.json").read_text())
    latest.update(
        epoch=1, weights="epoch1.safetensors", trainer="epoch1.trainer.pt", metrics=latest["metrics"][:1]
    )
    (tmp_path / "latest.json").write_text(json.dumps(latest))
    resumed_student = _pruned()[1]
    resumed = ks.finetune(
        resumed_student, teacher, x, epochs=2, checkpoint_dir=tmp_path, resume=True, **kwargs
    )
    assert resumed.resumed_from == 1
    for name in plan.masks:
        assert torch.equal(resumed.masks[name], whole.masks[name]), name
    torch.testing.assert_close(resumed_student.state_dict(), student.state_dict())


@pytest.mark.parametrize(
    ("change", "error", "message"),
    [
        ({"plan": "masks"}, ValueError, "learn_masks needs plan= a SparsityPlan"),
        ({"learn_masks": "yes"}, TypeError, "learn_masks must be a bool"),
        ({"plan": "816"}, ValueError, "8:16 has 12870"),
        ({"teacher": "other"}, ValueError, "layer 'fc2'"),
    ],
)
def test_refusals_leave_the_student_as_it_was(change: dict, error: type, message: str) -> None:
    teacher, student, plan, x = _pruned()
    kwargs: dict = {"plan": plan, "learn_masks": True, "progress": False}
    if change.get("plan") == "masks":
        kwargs["plan"] = dict(plan.masks)
    elif change.get("plan") == "816":
        kwargs["plan"] = SparsityPlan(Pattern.parse("8:16"), {"fc2": torch.ones(32, 32, dtype=torch.bool)})
    elif change.get("teacher") == "other":
        teacher = copy.deepcopy(teacher)
        teacher.fc2 = nn.Linear(16, 32)
    else:
        kwargs.update(change)
    before = snapshot(student)
    with pytest.raises(error, match=message):
        ks.finetune(student, teacher, x, **kwargs)
    assert_same(before, snapshot(student))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [({"lr": 0}, "MaskLearning.lr"), ({"temperature": (1.0,)}, "temperature"), ({"prior": -1}, "prior")],
)
def test_mask_learning_is_validated(kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        MaskLearning(**kwargs)


def test_cli_finetune_learns_masks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``knsparse finetune --learn-masks`` on a 'knsparse prune' output: the written layers are
    still 2:4 sparse modules, now with the learned masks; a student with no pattern is refused."""
    from safetensors.torch import save_file

    from knsparse.cli import main
    from knsparse.models import vit_tiny_digits
    from knsparse.sparse.modules import sparse_layers

    torch.manual_seed(0)
    teacher = vit_tiny_digits()
    result = ks.prune(teacher, "magnitude", "2:4", progress=False)
    student = result.model
    ks.swap_modules(student, result.plan)
    dense, pruned, tuned = (tmp_path / f"{n}.safetensors" for n in ("dense", "pruned", "tuned"))
    save_file(teacher.state_dict(), str(dense))
    ks.save_sparse(student, pruned)
    data = tmp_path / "data.safetensors"
    save_file({"inputs": torch.randn(64, 1, 8, 8, generator=torch.Generator().manual_seed(0))}, str(data))
    argv = ["finetune", "--model", "vit_tiny_digits", "--weights", str(pruned)]
    argv += ["--teacher-weights", str(dense)]
    argv += ["--data", str(data), "--epochs", "2", "--batch-size", "16", "--out", str(tuned), "--quiet"]
    assert main([*argv, "--learn-masks", "--mask-lr", "0.5"]) == 0
    loaded = vit_tiny_digits()
    ks.load_sparse(loaded, tuned)
    layers = sparse_layers(loaded)
    assert set(layers) == set(result.plan.masks)
    moved = 0
    for name, layer in layers.items():
        assert nm_violation(layer.mask(), result.plan.pattern) is None, name
        moved += int((layer.mask() != result.plan.masks[name]).sum())
    assert moved > 0
    # zeros in dense layers carry no pattern: nothing to choose the candidates from
    zeros = tmp_path / "zeros.safetensors"
    dense_pruned = ks.prune(teacher, "magnitude", "2:4", progress=False).model
    save_file({k: v.contiguous() for k, v in dense_pruned.state_dict().items()}, str(zeros))
    argv[argv.index(str(pruned))] = str(zeros)
    assert main([*argv, "--learn-masks"]) == 2
    assert "--learn-masks needs a 'knsparse prune' output with one k:n pattern" in capsys.readouterr().err
