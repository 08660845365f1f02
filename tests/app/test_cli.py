"""The command line: complete help, one-line errors with status 2, and the
prune -> inspect -> export -> check -> audit round trip on a small model."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from knsparse.cli import main
from knsparse.models import vit_tiny_digits

COMMANDS = ("prune", "inspect", "export", "audit", "demo")


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([command, "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert f"usage: knsparse {command}" in out and "--help" in out


def test_top_level_help_lists_all_commands(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--model", "nope", "--out", "x.safetensors"], "unknown model 'nope'"),
        (["inspect", "--model", "resnet50", "--weights", "missing.safetensors"], "no weights file"),
        (["export", "--check", "missing.onnx"], "no ONNX file"),
        (["export", "--model", "vit_tiny_digits"], "export needs --model and --out"),
        (["inspect", "--model", "timm:vit_base_patch16_224"], "timm"),
    ],
)
def test_user_mistakes_print_one_line_and_exit_2(argv, message, capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    pytest.importorskip("knsparse")
    if argv[-1].startswith("timm:"):
        try:
            import timm  # noqa: F401

            pytest.skip("timm is installed here, so this is not a mistake")
        except Exception:
            pass
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and "Traceback" not in err


def test_bad_pattern_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["prune", "--model", "vit_tiny_digits", "--pattern", "5:4", "--out", "x"])
    assert exit_info.value.code == 2
    assert "invalid sparsity pattern '5:4'" in capsys.readouterr().err


def test_weights_of_another_architecture_are_refused(tmp_path, capsys):
    path = tmp_path / "vit.safetensors"
    save_file({k: v.contiguous() for k, v in vit_tiny_digits().state_dict().items()}, str(path))
    assert main(["inspect", "--model", "resnet_tiny_digits", "--weights", str(path)]) == 2
    assert "does not fit model 'resnet_tiny_digits'" in capsys.readouterr().err


def test_prune_inspect_export_check_audit_round_trip(tmp_path, capsys):
    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in vit_tiny_digits().state_dict().items()}, str(init))
    pruned = tmp_path / "pruned.safetensors"
    base = ["--model", "vit_tiny_digits"]
    argv = ["prune", *base, "--weights", str(init), "--out", str(pruned), "--quiet", "--fuse-activations"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "swapped 17 layer(s)" in out and "patch_embed.proj" in out and pruned.is_file()
    assert "fused the activation into 4 MLP fc1 layer(s)" in out

    assert main(["inspect", *base, "--weights", str(pruned), "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    layers = {row["layer"]: row for row in info["layers"]}
    assert (
        layers["blocks.0.mlp.fc1"]["pattern"] == "2:4" and layers["blocks.0.mlp.fc1"]["runs"] == "reference"
    )
    assert layers["patch_embed.proj"]["runs"] == "dense" and 0.4 < info["macs"]["reduction"] < 0.5

    onnx_path = tmp_path / "pruned.onnx"
    assert main(["export", *base, "--weights", str(pruned), "--out", str(onnx_path)]) == 0
    out = capsys.readouterr().out
    assert "CPUExecutionProvider: max |ONNX Runtime - PyTorch|" in out and "17 of 18 weight" in out
    assert main(["export", "--check", str(onnx_path)]) == 0
    table = capsys.readouterr().out
    assert "| blocks.0.attn.qkv | [64, 192] | MatMul | K = axis 0 ([..., K, N]) | yes |" in table
    assert "Cin=1 is not a multiple of 4" in table

    audit_dir = tmp_path / "audit"
    argv = ["audit", *base, "--weights", str(pruned), "--batch-sizes", "1,2", "--repeats", "2"]
    assert main([*argv, "--out", str(audit_dir), "--quiet", "--fuse-activations"]) == 0
    out = capsys.readouterr().out
    assert "no sparse tensor cores were measured" in out
    assert "activations fused into the sparse fc1 of 4 MLP block(s)" in out
    assert {p.name for p in audit_dir.iterdir()} == {
        "vit_tiny_digits.md",
        "vit_tiny_digits.json",
        "vit_tiny_digits.png",
    }


@pytest.mark.parametrize(
    ("argv", "flag"),
    [
        (["export", "--model", "vit_tiny_digits", "--out", "m.onnx", "--batch", "0"], "--batch"),
        (
            ["prune", "--model", "vit_tiny_digits", "--out", "p.safetensors", "--repair-epochs", "-1"],
            "--repair-epochs",
        ),
        (["audit", "--model", "vit_tiny_digits", "--repeats", "0"], "--repeats"),
        (["export", "--model", "vit_tiny_digits", "--out", "m.onnx", "--opset", "12"], "--opset"),
        (["inspect", "--model", "vit_tiny_digits", "--seed", "x"], "--seed"),
        *(
            (["finetune", "--model", "vit_tiny_digits", "--out", "f.safetensors", flag, value], flag)
            for flag, value in [
                ("--epochs", "0"),
                ("--batch-size", "0"),
                ("--lr", "-1"),
                ("--weight-decay", "nan"),
                ("--warmup", "1.5"),
                ("--temperature", "0"),
                ("--label-weight", "inf"),
                ("--grad-clip", "-1"),
            ]
        ),
    ],
)
def test_bad_numbers_are_one_line_argument_errors(argv, flag, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"argument {flag}" in err and "usage" not in err


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["prune", "--model", "vit_tiny_digits", "--out", "folder"], "is a folder"),
        (["export", "--model", "vit_tiny_digits", "--out", "afile/m.onnx"], "is a file"),
        (["audit", "--model", "vit_tiny_digits", "--out", "afile"], "is an existing file"),
        (["demo", "--out", "afile"], "is an existing file"),
        (["prune", "--model", "vit_tiny_digits", "--out", "/proc/p.safetensors"], "cannot write into /proc"),
        *(
            (["finetune", "--model", "vit_tiny_digits", "--out", "f.safetensors", *extra], message)
            for extra, message in [
                (["--checkpoint-dir", "afile"], "--checkpoint-dir afile is an existing file"),
                (["--metrics", "folder"], "--metrics folder is a folder"),
                (["--resume"], "--resume needs --checkpoint-dir"),
            ]
        ),
    ],
)
def test_bad_outputs_are_refused_before_any_work(argv, message, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "folder").mkdir()
    (tmp_path / "afile").write_text("keep me")

    def no_work(*args, **kwargs):
        raise AssertionError("the command started working before checking --out")

    for command in ("prune", "finetune", "inspect", "export", "audit"):
        monkeypatch.setattr(f"knsparse.cli.{command}.load_model", no_work)
    monkeypatch.setattr("knsparse.app.report.build_report", no_work)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err
    assert (tmp_path / "afile").read_text() == "keep me"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile", "folder"]


@pytest.mark.parametrize("damage", ["pickle", "truncated", "empty"])
def test_unreadable_weights_are_one_clear_error(damage, tmp_path, capsys):
    path = tmp_path / "w.safetensors"
    good = {k: v.contiguous() for k, v in vit_tiny_digits().state_dict().items()}
    save_file(good, str(path))
    if damage == "pickle":
        torch.save(good, path)
    elif damage == "truncated":
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    else:
        path.write_bytes(b"")
    assert main(["inspect", "--model", "vit_tiny_digits", "--weights", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and str(path) in err and "Traceback" not in err


def test_no_reconstruct_belongs_to_cast(capsys):
    code = main(["prune", "--model", "vit_tiny_digits", "--no-reconstruct", "--out", "unused.safetensors"])
    assert code == 2
    assert "--no-reconstruct is a cast/cast-conv option" in capsys.readouterr().err
