"""Configs and recipes: validated on construction, resolved (defaults filled in), JSON round
trip, ``prune(model, config)`` equal to the keyword form, and the CLI's ``--recipe`` replaying a
run exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import knsparse as ks
from knsparse.cli import main
from knsparse.models import vit_tiny_digits
from knsparse.pruning.config import RECIPE_VERSION


def full_config() -> ks.PruneConfig:
    return ks.PruneConfig(
        ks.MethodConfig("cast", {"shrinkage": 0.2}),
        "2:4/crs",
        sparsity=0.6,
        permute=ks.PermuteConfig(time_budget_s=1.5, max_iters=3),
        repair=ks.RepairConfig("asr", {"lam": 0.1}),
        diagnostics=ks.DiagnosticsConfig(spectra=True, certificate=True, lam1=0.01, lipschitz={"fc": 2.0}),
        keep_dense=("head", "blocks.0.*"),
    )


def test_recipe_round_trip_is_exact(tmp_path: Path) -> None:
    config = full_config()
    data = config.to_dict()
    assert data["knsparse_recipe"] == RECIPE_VERSION and data["pattern"] == "2:4/crs"
    assert data["method"]["options"]["reconstruct"] is True  # resolved: the default is written down
    assert data["permute"]["seed"] == 0 and data["permute"]["time_budget_s"] == 1.5
    assert ks.PruneConfig.from_dict(json.loads(json.dumps(data))) == config
    assert ks.PruneConfig.load(config.save(tmp_path / "r.json")) == config
    unstructured = ks.PruneConfig("magnitude", None, sparsity=0.5)
    assert ks.PruneConfig.from_dict(unstructured.to_dict()) == unstructured


@pytest.mark.parametrize(
    ("build", "error", "match"),
    [
        (lambda: ks.PruneConfig("obd"), ValueError, "method must be one of"),
        (lambda: ks.MethodConfig("magnitude", {"moed": "global"}), ValueError, r"unknown option.*'moed'"),
        (lambda: ks.MethodConfig("magnitude", {"mode": object()}), TypeError, "JSON value"),
        (lambda: ks.PermuteConfig(effort=3), ValueError, "unknown option.*permute"),
        (lambda: ks.PermuteConfig(max_iters=-1), ValueError, "max_iters"),
        (lambda: ks.RepairConfig("magic"), ValueError, "repair must be one of"),
        (lambda: ks.RepairConfig("bn", {"lam": 1.0}), ValueError, "unknown option"),
        (lambda: ks.PruneConfig("magnitude", "2:4", permute="yes"), TypeError, "permute"),
        (lambda: ks.PruneConfig("magnitude", None, sparsity=0.5, permute=True), ValueError, "k:n pattern"),
        (lambda: ks.PruneConfig("magnitude", "2:4", sparsity=0.5), ValueError, "fixes the sparsity"),
        (lambda: ks.PruneConfig("magnitude", "2:4/rcs"), ValueError, "conv order"),
        (lambda: ks.PruneConfig("magnitude", keep_dense=3), TypeError, "keep_dense"),
        (lambda: ks.DiagnosticsConfig(lam1=float("nan")), ValueError, "lam1"),
        (
            lambda: ks.PruneConfig.from_dict({"knsparse_recipe": 1, "method": "magnitude", "x": 1}),
            ValueError,
            "'x'",
        ),
        (
            lambda: ks.PruneConfig.from_dict({"knsparse_recipe": 9, "method": "magnitude"}),
            ValueError,
            "knsparse_recipe",
        ),
        (lambda: ks.PruneConfig.from_json("{not json"), ValueError, "not JSON"),
    ],
)
def test_bad_configs_are_refused_naming_the_field(build, error, match) -> None:
    with pytest.raises(error, match=match):
        build()


def test_a_bad_recipe_file_is_named(tmp_path: Path) -> None:
    path = tmp_path / "r.json"
    path.write_text(
        '{"knsparse_recipe": 1, "method": {"name": "magnitude", "options": {"mode": "x", "z": 1}}}'
    )
    with pytest.raises(ValueError, match=f"recipe {str(path)!r}.*'z'"):
        ks.PruneConfig.load(path)
    with pytest.raises(FileNotFoundError, match="no such file"):
        ks.PruneConfig.load(tmp_path / "missing.json")


def test_prune_by_config_equals_the_keyword_form() -> None:
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    calib = [torch.randn(16, 1, 8, 8) for _ in range(2)]
    by_keywords = ks.prune(
        model, "wanda", "2:4", calib=calib, permute={"max_iters": 2}, repair="bn", progress=False
    )
    by_config = ks.prune(model, by_keywords.config, calib=calib, progress=False)
    assert by_keywords.config.permute.options["max_iters"] == 2
    for name, mask in by_keywords.masks.items():
        assert torch.equal(mask, by_config.masks[name]), name
    assert by_config.plan.recipe == by_keywords.config.to_dict()


def test_cli_recipe_replays_a_run_exactly(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    first, second = tmp_path / "a.safetensors", tmp_path / "b.safetensors"
    recipe = tmp_path / "recipe.json"
    argv = ["prune", "--model", "vit_tiny_digits", "--quiet", "--method", "cast", "--option", "shrinkage=0.3"]
    argv += ["--permute-option", "max_iters=2", "--keep-dense", "head", "--save-recipe", str(recipe)]
    assert main([*argv, "--out", str(first)]) == 0
    saved = ks.PruneConfig.load(recipe)
    assert saved.method.options["shrinkage"] == 0.3 and saved.permute.options["max_iters"] == 2
    assert saved.keep_dense == ("head",)
    assert (
        main(
            ["prune", "--model", "vit_tiny_digits", "--quiet", "--recipe", str(recipe), "--out", str(second)]
        )
        == 0
    )
    a, b = load_file(str(first)), load_file(str(second))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    capsys.readouterr()
    code = main(
        [
            "prune",
            "--model",
            "vit_tiny_digits",
            "--recipe",
            str(recipe),
            "--method",
            "wanda",
            "--out",
            str(first),
        ]
    )
    assert code == 2 and "remove --method" in capsys.readouterr().err
