"""The demo report end to end, on untrained models so it runs in seconds (the real demo
trains them, or reuses the cached checkpoints)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from knsparse.app import report
from knsparse.cli import main
from knsparse.models import resnet_tiny_digits, vit_tiny_digits


def test_demo_writes_the_full_report(tmp_path, monkeypatch, capsys):
    untrained = {"vit_tiny_digits": vit_tiny_digits, "resnet_tiny_digits": resnet_tiny_digits}

    def fake_pretrained(name: str, seed: int = 0, progress: bool = True) -> torch.nn.Module:
        torch.manual_seed(seed)
        return untrained[name]().eval()

    monkeypatch.setattr(report, "pretrained", fake_pretrained)
    monkeypatch.setattr(report, "REPAIR_EPOCHS", {"vit_tiny_digits": 0, "resnet_tiny_digits": 1})
    out = tmp_path / "knsparse-report"
    assert main(["demo", "--out", str(out), "--batch-sizes", "1,4", "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "no sparse tensor cores were measured" in printed and "report:" in printed

    names = {p.name for p in out.iterdir()}
    assert {
        "index.md",
        "report.json",
        "sparsity_per_layer.png",
        "speedup_vs_batch.png",
        "onnx",
        "audit",
    } <= names
    assert {p.name for p in (out / "onnx").iterdir()} == {"vit_tiny_digits.onnx", "resnet_tiny_digits.onnx"}
    index = (out / "index.md").read_text()
    for heading in (
        "## Accuracy and MACs",
        "## MACs at ImageNet shapes",
        "## Sparsity per layer",
        "## Marchenko–Pastur fits of the dense layers",
        "## ONNX export",
        "## Throughput audit",
    ):
        assert heading in index
    assert "vit_base_patch16_224 + ToMe r=16 | 17.56 |" in index and "| resnet50 | 4.09 |" in index
    assert (
        "resnet_tiny_digits: channel permutation, cast-conv 2:4 masks, then asr repair, "
        "then 1 epoch of masked fine-tuning"
        in index
        and "no sparse tensor cores were measured" in index
    )

    data = json.loads((out / "report.json").read_text())
    assert {"device", "versions", "commit"} <= set(data["environment"])
    vit, resnet = data["models"]
    assert vit["name"] == "vit_tiny_digits" and vit["onnx"]["max_abs_diff"]["CPUExecutionProvider"] <= 1e-4
    assert resnet["prune"]["accuracy_repaired"] is not None and len(vit["audit"]["rows"]) == 2
    assert vit["prune"]["layers"]["method"] == "cast" and vit["prune"]["layers"]["permuted"]
    assert resnet["prune"]["layers"]["repair"] == "asr"
    assert {row["name"] for row in vit["mp_fits"]} >= {"blocks.0.mlp.fc1", "head"}
    assert all(Path(row["plot"]).is_file() for row in vit["mp_fits"] + resnet["mp_fits"])
    assert 0.4 < data["imagenet_macs"]["vit_base_patch16_224"]["reduction"] < 0.5
