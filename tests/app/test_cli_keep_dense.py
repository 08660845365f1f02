"""``knsparse prune --keep-dense auto --target-agreement / --target-kl``: the flags build the
config's DenseTarget (and refuse the options alone), and the command reports what it kept dense."""

from __future__ import annotations

from pathlib import Path

import pytest

from knsparse.cli import build_parser, main
from knsparse.cli.recipe import config_from_args
from knsparse.pruning.config import DenseTarget, PruneConfig


def test_flags_build_the_dense_target_and_its_recipe(tmp_path: Path, capsys) -> None:
    recipe = tmp_path / "r.json"
    base = ["prune", "--model", "vit_tiny_digits", "--method", "wanda", "--out", str(tmp_path / "x.st")]
    args = ["--keep-dense", "auto", "--keep-dense", "head", "--target-kl", "0.05", "--max-dense", "3"]
    parsed = build_parser().parse_args([*base, *args, "--holdout-every", "2"])
    config = config_from_args(parsed)
    assert config.dense_target == DenseTarget(kl=0.05, holdout_every=2, max_dense=3)
    assert config.keep_dense == ("head",)
    config.save(recipe)
    assert PruneConfig.load(recipe) == config
    assert main([*base, "--keep-dense", "auto"]) == 2
    assert "needs --target-agreement and/or --target-kl" in capsys.readouterr().err
    assert main([*base, "--max-dense", "2"]) == 2
    assert "keep-dense auto options" in capsys.readouterr().err
    assert main([*base, "--recipe", str(recipe), "--target-kl", "0.1"]) == 2
    assert "--target-kl" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([*base, "--target-agreement", "1.5"])
    assert "--target-agreement" in capsys.readouterr().err


@pytest.mark.slow
def test_prune_keeps_layers_dense_to_the_target(tmp_path: Path, capsys) -> None:
    out = tmp_path / "p.safetensors"
    argv = ["prune", "--model", "resnet_tiny_digits", "--method", "wanda", "--target-agreement", "0.99"]
    assert main([*argv, "--out", str(out), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "keep_dense auto (agreement >= 99.00%, greedy by KL per MAC" in printed
    assert "kept dense (" in printed and "sparse-execution share" in printed and out.is_file()
    kept = [line for line in printed.splitlines() if "kept dense (keep_dense auto" in line]
    assert kept  # each kept layer is listed dense with what it costs alone
