"""``knsparse prune --quantize`` (the recipe field, the quantized accuracy) and ``knsparse export
--quantize`` (Q/DQ ONNX from a pruned file, 2:4 through the DequantizeLinear), with their
one-line refusals."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from knsparse.cli import main
from knsparse.deploy.export import check, read_metadata
from knsparse.models import vit_tiny_digits

pytest.importorskip("onnxruntime")


def test_prune_then_export_quantized(tmp_path, capsys):
    torch.manual_seed(0)
    init = tmp_path / "init.safetensors"
    save_file({k: v.contiguous() for k, v in vit_tiny_digits().state_dict().items()}, str(init))
    pruned, recipe = tmp_path / "pruned.safetensors", tmp_path / "recipe.json"
    base = ["--model", "vit_tiny_digits"]
    argv = ["prune", *base, "--weights", str(init), "--out", str(pruned), "--quiet", "--quantize", "int8"]
    assert main([*argv, "--save-recipe", str(recipe)]) == 0
    out = capsys.readouterr().out
    assert "quantized int8 (fake-quantized, for evaluation" in out and ", int8 " in out
    assert json.loads(recipe.read_text())["quantize"] == "int8"

    onnx_path = tmp_path / "q.onnx"
    argv = ["export", *base, "--weights", str(pruned), "--out", str(onnx_path), "--quantize", "int8"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "Q/DQ (int8): fed ONNX Runtime's activation codes" in out
    meta = read_metadata(onnx_path)
    assert meta["quantization"]["dtype"] == "int8" and meta["plan"]["pattern"] == "2:4"
    weights = [c for c in check(onnx_path) if c.consumer is not None]
    assert all(c.name.endswith("_quantized") for c in weights)
    assert sum(c.is_24 for c in weights) == 17  # every pruned layer but patch_embed (Cin=1)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--quantize", "int8", "--dtype", "float16"], "--quantize writes float32"),
        (["--data", "somewhere"], "--data is the calibration set of --quantize"),
        (["--quantize", "int4"], "invalid choice: 'int4'"),
    ],
)
def test_export_quantize_refusals(argv, message, tmp_path, capsys):
    base = ["export", "--model", "vit_tiny_digits", "--out", str(tmp_path / "m.onnx")]
    try:
        code = main([*base, *argv])
    except SystemExit as exc:
        code = exc.code
    assert code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "m.onnx").exists()
