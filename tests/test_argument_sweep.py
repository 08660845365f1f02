"""Issue 13 class 6, swept: every public function of ``knsparse`` and its subpackages, each
argument given the classic mistakes (wrong type, a str where a list goes, negative / zero / NaN /
inf numbers, a bool for an int, empty / meta / complex / integer / wrongly shaped tensors, a
pattern that is not k:n, an unknown option). Each must end in a ``TypeError``/``ValueError``
raised by knsparse itself whose message names the argument, with every model passed in left
exactly as it was."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from torch import nn
from untouched import assert_same, snapshot

import knsparse as ks
from knsparse.deploy import tome
from knsparse.models import resnet_tiny_digits, vit_tiny_digits
from knsparse.pruning import budget, permutation, repair, score, spectral

NAN, INF = float("nan"), float("inf")
EMPTY = torch.empty(0, 8)
META = torch.empty(8, 8, device="meta")
COMPLEX = torch.randn(8, 8, dtype=torch.complex64)
INTS = torch.randint(0, 5, (8, 8))

MODEL = ("model", None, 3)
POS_INT = (0, -1, 2.5, True, "3", NAN)
NONNEG_INT = (-1, 2.5, True, "3")
POS_FLOAT = (0.0, -1.0, NAN, INF, "0.5", True)
NONNEG_FLOAT = (-1.0, NAN, INF, "0.5", True)
FRACTION = (-0.1, 1.5, NAN, "0.5", True)
TENSOR = (EMPTY, META, COMPLEX, INTS, [[1.0, 2.0]])
MP_INPUT = (EMPTY, META, COMPLEX, "x", [])  # numbers, lists and integer tensors are fine here
PATTERN = ("2-4", "4:2", 24, "0:4", "2:4:8", "")
FLAG = ("yes", None, 2)  # a flag that is not a bool; `progress` (only a bar) takes any truthy value
CHOICE = ("nope", 3)
CALIB = ("abc", 5, [], [torch.randn(2, 3, 5, 5)], [torch.randint(0, 9, (4,))])
NAMES = (5, [1, 2])
SHAPE = ((0, 1, 8, 8), "1x8x8", (1, -1, 8, 8), (1, 8), (1, 1, 8.5, 8))


def mixed(model: nn.Module) -> nn.Module:
    """A train-mode model with one eval-mode submodule and one frozen parameter: the flags a
    failed call must keep."""
    model.train()
    norms = [m for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm2d))]
    norms[0].eval()
    next(model.parameters()).requires_grad_(False)
    return model


def mlp() -> nn.Module:
    torch.manual_seed(0)
    return mixed(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.LayerNorm(32), nn.Linear(32, 8)))


def pruned(model: nn.Module) -> nn.Module:
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, nn.Linear) and m.in_features % 4 == 0 and m.out_features > 10:
                m.weight.mul_(ks.nm_mask(m.weight.abs(), "2:4"))
    return model


def vit() -> nn.Module:
    torch.manual_seed(0)
    return mixed(vit_tiny_digits())


def resnet() -> nn.Module:
    torch.manual_seed(0)
    return mixed(resnet_tiny_digits())


def images(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 1, 8, 8)


def fc_masks(model: nn.Module, *names: str) -> dict[str, torch.Tensor]:
    return {n: ks.nm_mask(model.get_submodule(n).weight.detach().abs(), "2:4") for n in names}


def fit() -> spectral.MPFit:
    torch.manual_seed(0)
    return spectral.mp_fit(torch.randn(32, 64))


def spectrum() -> spectral.LayerSpectrum:
    torch.manual_seed(0)
    return spectral.fit_weights({"a": torch.randn(32, 64)})["a"]


# (call id, function, baseline keyword arguments (given a scratch folder), {argument: bad values})
# and optionally the regex the message must match when it is not the argument's name.
ENTRIES: list[tuple[str, Callable, Callable[[Path], dict], dict[str, tuple]]] = [
    (
        "audit",
        ks.audit,
        lambda tmp: dict(
            model=pruned(vit()),
            input_shape=(1, 8, 8),
            batch_sizes=(2,),
            warmup=0,
            repeats=1,
            min_time_s=0.0,
            progress=False,
        ),
        {
            "model": MODEL,
            "input_shape": SHAPE,
            "batch_sizes": ([0], [2.5], "8", [], [True], 8),
            "dtype": ("float16", torch.int8, 5),
            "backend": CHOICE,
            "tome_r": (-1, 2.5, "2", True, [1, 1]),
            "plan": ("x", {"blocks.0.mlp.fc1": torch.ones(3, 3, dtype=torch.bool)}, {"nope": INTS}),
            "pattern": PATTERN,
            "checkpoint": (5,),
            "device": ("gpu0", 5),
            "cuda_graphs": FLAG,
            "warmup": NONNEG_INT,
            "repeats": POS_INT,
            "min_time_s": NONNEG_FLOAT,
            "fuse_activations": FLAG,
        },
    ),
    (
        "export_onnx",
        ks.export_onnx,
        lambda tmp: dict(model=mlp(), example_input=images(1), path=tmp / "m.onnx"),
        {
            "model": MODEL,
            "example_input": ("x", EMPTY, META, COMPLEX, torch.randn(1, 3, 5, 5)),
            "path": (123, None),
            "opset": (0, 2.5, "17", True, -1),
            "dynamic_batch": FLAG,
            "check": FLAG,
            "permutations": ("x", {"1": [0, 0, 1]}, {"nope": list(range(32))}),
            "exporter": CHOICE,
            "tolerance": (-1.0, NAN, "1e-4", INF),
            "dtype": ("float8", torch.int8, 5),
            "plan": ("x", {"1": torch.ones(3, 3, dtype=torch.bool)}),
        },
    ),
    (
        "finetune",
        ks.finetune,
        lambda tmp: dict(
            student=pruned(mlp()),
            teacher=mlp(),
            data=(images(16), torch.randint(0, 8, (16,))),
            epochs=1,
            batch_size=8,
            progress=False,
        ),
        {
            "student": MODEL,
            "teacher": MODEL,
            "data": ("abc", 5, EMPTY, [], (images(16), torch.randint(0, 8, (3,)))),
            "epochs": POS_INT,
            "plan": ("x", {"1": torch.ones(3, 3, dtype=torch.bool)}, {"nope": torch.ones(32, 64)}),
            "val": ("abc", 5),
            "batch_size": POS_INT,
            "lr": POS_FLOAT,
            "weight_decay": NONNEG_FLOAT,
            "warmup": FRACTION,
            "temperature": POS_FLOAT,
            "label_weight": NONNEG_FLOAT,
            "grad_clip": POS_FLOAT,
            "amp": ("fp8", 3),
            "checkpoint_dir": (123,),
            "resume": FLAG,
            "metrics_path": (123,),
            "seed": ("0", 2.5, None),
            "num_workers": (-1, 2.5, "2"),
            # the mask dict of pruned() has no pattern to choose candidates from
            "learn_masks": ("yes", 1, True),
            "freeze_norm": FLAG,
        },
    ),
    (
        "repair.asr",
        repair.asr,
        lambda tmp: dict(model=pruned(mlp()), dense_model=mlp(), calib=[images()]),
        {
            "model": MODEL,
            "dense_model": (*MODEL, nn.Sequential(nn.Flatten(), nn.Linear(64, 8))),
            "calib": CALIB,
            "shrinkage": CHOICE,
            "lam": (-1.0, NAN, "0.1", INF, True),
        },
    ),
    (
        "repair.layerwise",
        repair.layerwise,
        lambda tmp: dict(model=pruned(mlp()), dense_model=mlp(), calib=[images()]),
        {"model": MODEL, "dense_model": MODEL, "calib": CALIB},
    ),
    (
        "repair.recalibrate_bn",
        repair.recalibrate_bn,
        lambda tmp: dict(model=resnet(), calib=[images()]),
        {"model": MODEL, "calib": CALIB},
    ),
    (
        "repair.apply",
        repair.apply,
        lambda tmp: dict(model=pruned(mlp()), dense_model=mlp(), calib=[images()], method="asr"),
        {"model": MODEL, "dense_model": MODEL, "calib": CALIB, "method": CHOICE},
    ),
    (
        "repair.pruned_layers",
        repair.pruned_layers,
        lambda tmp: dict(model=pruned(mlp()), dense_model=mlp()),
        {"model": MODEL, "dense_model": MODEL},
    ),
    (
        "tome.apply",
        tome.apply,
        lambda tmp: dict(model=vit(), r=2),
        {"model": (*MODEL, mlp()), "r": (-1, 2.5, "2", True, [1, 1], [1, 1, 1, -1], None)},
    ),
    ("tome.remove", tome.remove, lambda tmp: dict(model=vit()), {"model": MODEL}),
    ("tome.is_applied", tome.is_applied, lambda tmp: dict(model=vit()), {"model": MODEL}),
    ("tome.merges_per_block", tome.merges_per_block, lambda tmp: dict(model=vit()), {"model": MODEL}),
    (
        "tome.schedule",
        tome.schedule,
        lambda tmp: dict(r=2, depth=4),
        {"r": NONNEG_INT, "depth": POS_INT, "kind": CHOICE},
    ),
    (
        "tome.token_counts",
        tome.token_counts,
        lambda tmp: dict(num_tokens=17, r=[2, 2]),
        {"num_tokens": POS_INT, "r": ("2", [-1], [2.5], 2), "num_protected": NONNEG_INT},
    ),
    (
        "tome.bipartite_soft_matching",
        tome.bipartite_soft_matching,
        lambda tmp: dict(metric=torch.randn(2, 9, 16), r=2),
        {"metric": (*TENSOR, torch.randn(9, 16)), "r": NONNEG_INT},
    ),
    ("fuse_activations", ks.fuse_activations, lambda tmp: dict(model=vit()), {"model": MODEL}),
    (
        "spectral.mp_pdf",
        spectral.mp_pdf,
        lambda tmp: dict(x=torch.linspace(0.1, 3, 8), q=0.5),
        {"x": MP_INPUT, "q": (0.0, -1.0, NAN, INF, "0.5", True), "sigma2": POS_FLOAT},
    ),
    (
        "spectral.mp_cdf",
        spectral.mp_cdf,
        lambda tmp: dict(x=torch.linspace(0.1, 3, 8), q=0.5),
        {"x": MP_INPUT, "q": (0.0, -1.0, NAN, INF, "0.5", True), "sigma2": POS_FLOAT},
    ),
    (
        "spectral.mp_quantile",
        spectral.mp_quantile,
        lambda tmp: dict(p=torch.linspace(0.1, 0.9, 8), q=0.5),
        {"p": MP_INPUT, "q": (0.0, -1.0, NAN, INF, "0.5", True)},
    ),
    (
        "spectral.fit_eigenvalues",
        spectral.fit_eigenvalues,
        lambda tmp: dict(eigenvalues=torch.rand(2, 16) + 0.1, shape=(16, 32)),
        {
            "eigenvalues": (*TENSOR, torch.rand(2, 5)),
            "shape": ((0, 32), (16,), "16x32", (16.5, 32)),
            "tw_quantile": (NAN, INF, "2", True),
            "band": ((0.9, 0.1), (-0.1, 0.5), "0.1", (NAN, 0.5)),
            "eps": (-1.0, NAN, "1e-7"),
        },
    ),
    (
        "spectral.batch_eigenvalues",
        spectral.batch_eigenvalues,
        lambda tmp: dict(ws=torch.randn(2, 8, 16)),
        {"ws": (*TENSOR, torch.randn(8, 16), "w")},
    ),
    (
        "spectral.fit_weights",
        spectral.fit_weights,
        lambda tmp: dict(weights={"a": torch.randn(32, 64)}),
        {
            "weights": ("x", [torch.randn(8, 8)], {"a": META}, {"a": COMPLEX}, {"a": EMPTY}),
            "max_batch_elements": POS_INT,
        },
    ),
    (
        "spectral.plot_esd",
        spectral.plot_esd,
        lambda tmp: dict(spectrum=spectrum(), path=tmp / "esd.png"),
        {"spectrum": ("x", 5), "path": (123, None)},
    ),
    (
        "spectral.diagnose",
        spectral.diagnose,
        lambda tmp: dict(model=mlp(), progress=False),
        {"model": MODEL, "plot_dir": (123,), "layers": NAMES},
    ),
    (
        "permutation.search",
        permutation.search,
        lambda tmp: dict(weight=torch.randn(16, 32), pattern="2:4", max_iters=5),
        {
            "weight": (*TENSOR, [torch.randn(16, 32), torch.randn(16, 8)], torch.randn(4, 6)),
            "pattern": PATTERN,
            "conv_order": CHOICE,
            "names": (5, ["a", "b", "c"]),
            "seed": ("0", 2.5),
            "time_budget_s": (-1.0, NAN, "1"),
            "max_iters": NONNEG_INT,
            "passes": POS_INT,
            "block_stripes": POS_INT,
            "segment": (0, -1, 2.5),
            "walk": NONNEG_INT,
            "kick_swaps": NONNEG_INT,
            "max_candidates": POS_INT,
            "windows": FLAG,
            "device": ("gpu0", 5),
        },
    ),
    (
        "permutation.find_groups",
        permutation.find_groups,
        lambda tmp: dict(model=mlp()),
        {"model": MODEL},
    ),
    (
        "permute",
        ks.permute,
        lambda tmp: dict(model=mlp(), pattern="2:4", max_iters=2),
        {
            "model": MODEL,
            "pattern": PATTERN,
            "calib": CALIB,
            "inplace": FLAG,
            "conv_order": CHOICE,
            "seed": ("0", 2.5),
            "block_stripes": POS_INT,
            "windows": FLAG,
            "passes": POS_INT,
        },
    ),
    (
        "budget.emp_global_masks",
        budget.emp_global_masks,
        lambda tmp: dict(scores={"a": torch.rand(8, 16)}),
        {"scores": ("x", [torch.rand(8, 16)], {"a": META}, {"a": EMPTY}), "beta": POS_FLOAT},
    ),
    (
        "budget.emp_mask",
        budget.emp_mask,
        lambda tmp: dict(scores=torch.rand(8, 16)),
        {"scores": (EMPTY, META, COMPLEX, [[1.0]]), "beta": POS_FLOAT},
    ),
    (
        "budget.emp_row_masks",
        budget.emp_row_masks,
        lambda tmp: dict(scores=torch.rand(8, 16)),
        {"scores": (EMPTY, META, COMPLEX, [[1.0]], torch.rand(16)), "beta": POS_FLOAT},
    ),
    (
        "budget.emp_mass_bound",
        budget.emp_mass_bound,
        lambda tmp: dict(n=16, n_eff=8),
        {"n": POS_INT, "n_eff": (*POS_INT, 17), "beta": POS_FLOAT},
    ),
    (
        "budget.mort",
        budget.mort,
        lambda tmp: dict(scores={"a": torch.rand(8, 16)}, sparsity=0.5),
        {
            "scores": ("x", [torch.rand(8, 16)], {"a": COMPLEX}),
            "sparsity": FRACTION,
            "mode": CHOICE,
            "robust": CHOICE,
            "min_keep_row": NONNEG_INT,
        },
    ),
    (
        "budget.mp_layer_sparsities",
        budget.mp_layer_sparsities,
        lambda tmp: dict(fits={"a": fit()}, weights={"a": torch.randn(32, 64)}, sparsity=0.5),
        {
            "fits": ("x", {"a": 5}, {"b": fit()}),
            "weights": ("x", {"a": META}, {"b": torch.randn(32, 64)}),
            "sparsity": FRACTION,
            "min_eigenvalues": NONNEG_INT,
            "max_sparsity": FRACTION,
        },
    ),
    (
        "score.prunable_weights",
        score.prunable_weights,
        lambda tmp: dict(model_or_weights=mlp()),
        {"model_or_weights": ("x", 5, [torch.randn(8, 8)]), "layers": (*NAMES, ["nope"])},
    ),
    (
        "score.magnitude",
        score.magnitude,
        lambda tmp: dict(model_or_weights=mlp()),
        {"model_or_weights": ("x", 5), "layers": (*NAMES, ["nope"])},
    ),
    (
        "score.yopo",
        score.yopo,
        lambda tmp: dict(model_or_weights=mlp(), rank=2, iters=3),
        {
            "model_or_weights": ("x", 5),
            "per_channel": FLAG,
            "normalize": FLAG,
            "layers": (*NAMES, ["nope"]),
            "conv_order": CHOICE,
            "max_chunk_bytes": POS_INT,
        },
    ),
    (
        "apply_masks",
        ks.apply_masks,
        lambda tmp: (lambda m: dict(model=m, masks=fc_masks(m, "1")))(mlp()),
        {
            "model": MODEL,
            "masks": ("x", [INTS], {"1": torch.ones(3, 3)}, {"nope": torch.ones(32, 64)}, {"1": "m"}),
        },
    ),
    (
        "prune",
        ks.prune,
        lambda tmp: dict(model=mlp(), method="magnitude", pattern="2:4", progress=False),
        {
            "model": MODEL,
            "method": CHOICE,
            "pattern": PATTERN,
            "sparsity": FRACTION,
            "calib": CALIB,
            "permute": ("yes", {"nope": 1}, 2),
            "repair": CHOICE,
            "inplace": FLAG,
            "conv_order": CHOICE,
            "sequential": FLAG,
            "bogus_option": (1,),
        },
    ),
    (
        "swap_modules",
        ks.swap_modules,
        lambda tmp: (lambda m: dict(model=m, plan=fc_masks(m, "1")))(mlp()),
        {"pattern": PATTERN, "include": (5, [1]), "exclude": (5, [1])},
    ),
    (
        "SparseLinear.from_dense",
        ks.SparseLinear.from_dense,
        lambda tmp: (lambda m: dict(linear=m[1], mask=fc_masks(m, "1")["1"]))(mlp()),
        {
            "linear": ("x", nn.Conv2d(4, 4, 1)),
            "mask": (*TENSOR, torch.ones(32, 64, dtype=torch.bool), torch.ones(64, 32, dtype=torch.bool)),
            "pattern": PATTERN,
            "backend": CHOICE,
        },
    ),
    (
        "SparseConv2d.from_dense",
        ks.SparseConv2d.from_dense,
        lambda tmp: (lambda c: dict(conv=c, mask=ks.nm_mask(c.weight.detach().abs(), "2:4")))(
            nn.Conv2d(8, 4, 3)
        ),
        {
            "conv": ("x", nn.Linear(4, 4)),
            "mask": (*TENSOR, torch.ones(4, 8, 3, 3, dtype=torch.bool)),
            "pattern": PATTERN,
            "backend": CHOICE,
            "conv_order": CHOICE,
        },
    ),
    (
        "SparseLinear",
        ks.SparseLinear,
        lambda tmp: dict(in_features=16, out_features=8),
        {"pattern": PATTERN, "bias": FLAG, "activation": CHOICE, "device": ("gpu0", 5)},
    ),
    (
        "load_sparse",
        ks.load_sparse,
        lambda tmp: dict(model=mlp(), path=tmp / "m.safetensors"),
        {"model": MODEL, "path": (123, None)},
    ),
    (
        "save_sparse",
        ks.save_sparse,
        lambda tmp: dict(model=mlp(), path=tmp / "m.safetensors"),
        {"path": (123,)},
    ),
    (
        "macs",
        ks.macs,
        lambda tmp: dict(model=vit(), input_shape=(1, 1, 8, 8)),
        {
            "model": MODEL,
            "input_shape": SHAPE,
            "tome_r": (-1, 2.5, "2", True),
            "pattern": PATTERN,
            "eligible": ("x", 5),
        },
    ),
    (
        "nm_mask",
        ks.nm_mask,
        lambda tmp: dict(scores=torch.rand(8, 16), pattern="2:4"),
        {"pattern": PATTERN, "name": (5,)},
    ),
    (
        "is_nm",
        ks.is_nm,
        lambda tmp: dict(t=torch.rand(8, 16), pattern="2:4"),
        {"t": ([[1.0]], "x"), "pattern": PATTERN},
    ),
    (
        "global_unstructured_masks",
        ks.global_unstructured_masks,
        lambda tmp: dict(scores={"a": torch.rand(8, 16)}, sparsity=0.5),
        {"min_keep_row": NONNEG_INT, "scores": ({"a": EMPTY}, {"a": COMPLEX}, {3: torch.rand(8, 16)})},
    ),
    (
        "pack_24",
        ks.pack_24,
        lambda tmp: dict(w=(torch.randn(32, 64) * ks.nm_mask(torch.rand(32, 64), "2:4")).half()),
        {"mask": (*TENSOR, torch.ones(32, 64, dtype=torch.bool), torch.ones(8, 8, dtype=torch.bool))},
    ),
    (
        "to_semi_structured",
        ks.to_semi_structured,
        lambda tmp: dict(w=(torch.randn(32, 64) * ks.nm_mask(torch.rand(32, 64), "2:4")).half()),
        {"w": (*TENSOR, torch.randn(32, 64).half()), "backend": CHOICE},
    ),
    ("backends.get", ks.backends.get, lambda tmp: dict(name="reference"), {"name": CHOICE}),
    (
        "Pattern.parse",
        ks.Pattern.parse,
        lambda tmp: dict(spec="2:4"),
        {"spec": (*PATTERN, None, " 2 : 4x")},
    ),
]

# messages that name the argument otherwise than by its parameter name
NAMED_AS = {
    "model_or_weights": "model|weights",
    "calib": "calib|batch",
    "data": "data|batch",
    "val": "val|batch",
    "spec": "pattern|spec",
    "q": "q ",
    "bogus_option": "bogus_option",
    "masks": "mask",
    "plan": "plan|mask",
    "name": "backend|name",
    "tome_r": "tome_r",
    "p": "^p ",
}

CASES = [
    pytest.param(fn, base, arg, bad, id=f"{name}-{arg}-{i}")
    for name, fn, base, bad_args in ENTRIES
    for arg, values in bad_args.items()
    for i, bad in enumerate(values)
]


def _raised_in_knsparse(exc: BaseException) -> bool:
    last = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path('knsparse')}/" in last.filename.replace("\\", "/") and "/torch/" not in last.filename


@pytest.mark.parametrize("fn, base, arg, bad", CASES)
def test_bad_argument_is_named_and_changes_nothing(fn, base, arg, bad, tmp_path):
    kwargs = base(tmp_path)
    if fn is ks.load_sparse:
        ks.save_sparse(pruned(mlp()), tmp_path / "m.safetensors")
    before = {k: (v, snapshot(v)) for k, v in kwargs.items() if isinstance(v, nn.Module)}
    kwargs[arg] = bad
    with pytest.raises((TypeError, ValueError)) as info:
        fn(**kwargs)
    assert _raised_in_knsparse(info.value), f"raised inside {traceback.extract_tb(info.tb)[-1].filename}"
    assert re.search(NAMED_AS.get(arg, arg), str(info.value)), str(info.value)
    for model, snap in before.values():
        assert_same(snap, snapshot(model))


@pytest.mark.parametrize("name, fn, base", [pytest.param(*e[:3], id=e[0]) for e in ENTRIES])
def test_baseline_call_works(name, fn, base, tmp_path):
    """Each sweep starts from a call that succeeds, so its refusals come from the bad argument."""
    kwargs = base(tmp_path)
    if fn is ks.load_sparse:
        ks.save_sparse(pruned(mlp()), tmp_path / "m.safetensors")
    if fn is ks.to_semi_structured and not torch.cuda.is_available():
        pytest.skip("needs CUDA")
    fn(**kwargs)
