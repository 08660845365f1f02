"""Bring your own model: timm / torchvision / Hugging Face sources, their preprocessing, the
user's checkpoints, and the CLI from a folder of images to a TensorRT-ready fp16 ONNX file.

Marked ``models``: they run in ``.venv-models`` (``make test-models``), where torchvision,
timm and transformers import.
"""

from __future__ import annotations

import builtins
from pathlib import Path

import pytest
import torch
from test_images import write_digits

from knsparse.app.registry import UserError, load_model, resolve
from knsparse.cli import main
from knsparse.deploy.onnx_check import check, read_metadata
from knsparse.sparse.modules import sparse_layers

pytestmark = pytest.mark.models


@pytest.fixture(scope="module")
def hf_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf-vit")
    config = transformers.ViTConfig(
        image_size=32,
        patch_size=8,
        hidden_size=32,
        num_hidden_layers=1,
        num_attention_heads=2,
        intermediate_size=64,
        num_labels=3,
    )
    config.save_pretrained(root)
    processor = transformers.ViTImageProcessor(
        size={"height": 32, "width": 32}, image_mean=[0.5] * 3, image_std=[0.25] * 3
    )
    processor.save_pretrained(root)
    return root


def test_each_source_brings_its_preprocessing(hf_dir: Path) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    timm_model = resolve("timm:resnet18")
    cfg = timm_model.model.pretrained_cfg
    assert timm_model.input_shape == tuple(cfg["input_size"])
    assert timm_model.preprocess.crop == tuple(cfg["input_size"][1:])
    assert timm_model.preprocess.mean == tuple(cfg["mean"])
    tv = resolve("torchvision:resnet18")
    assert (tv.preprocess.resize, tv.preprocess.crop, tv.input_shape) == (256, (224, 224), (3, 224, 224))
    hf = resolve(f"hf:{hf_dir}")
    assert (
        hf.input_shape == (3, 32, 32)
        and hf.preprocess.mean == (0.5,) * 3
        and "random weights" in hf.description
    )
    assert hf.model(torch.randn(2, 3, 32, 32)).logits.shape == (2, 3)


def test_hf_directory_with_weights_loads_them(hf_dir: Path, tmp_path: Path) -> None:
    first = resolve(f"hf:{hf_dir}").model
    saved = tmp_path / "with-weights"
    first.save_pretrained(saved)
    (saved / "preprocessor_config.json").write_text((hf_dir / "preprocessor_config.json").read_text())
    again = resolve(f"hf:{saved}")
    assert "weights from" in again.description
    x = torch.randn(1, 3, 32, 32)
    torch.testing.assert_close(again.model(x).logits, first(x).logits)
    with pytest.raises(UserError, match="not a Hugging Face model directory"):
        resolve(f"hf:{tmp_path}")


def test_checkpoints_load_safely_with_a_strict_key_check(tmp_path: Path) -> None:
    pytest.importorskip("torchvision")
    source = resolve("torchvision:resnet18", seed=1).model
    wrapped = {"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()}}  # a DDP checkpoint
    path = tmp_path / "r18.pth"
    torch.save(wrapped, path)
    loaded = load_model("torchvision:resnet18", str(path))
    assert all(
        torch.equal(a, b)
        for a, b in zip(loaded.model.state_dict().values(), source.state_dict().values(), strict=True)
    )
    with pytest.raises(UserError, match=r"does not fit model 'torchvision:resnet34': missing keys"):
        load_model("torchvision:resnet34", str(path))
    evil = tmp_path / "evil.pt"
    torch.save({"w": torch.ones(1), "f": print}, evil)  # a callable: refused by weights_only=True
    with pytest.raises(UserError, match="cannot be loaded safely"):
        load_model("torchvision:resnet18", str(evil))
    text = tmp_path / "w.txt"
    text.write_text("0")
    with pytest.raises(UserError, match="unknown checkpoint type"):
        load_model("torchvision:resnet18", str(text))


def test_a_missing_extra_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    real_import = builtins.__import__

    def no_timm(name, *args, **kwargs):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(UserError, match=r"needs timm \(pip install 'knsparse\[timm\]'\)"):
        resolve("timm:resnet18")


@pytest.mark.slow
@pytest.mark.parametrize(
    ("model", "method"),
    [
        ("timm:resnet18", ["--method", "cast-conv", "--permute", "--no-reconstruct"]),
        ("torchvision:resnet18", []),
        ("hf", []),
    ],
)
def test_images_to_a_tensorrt_ready_fp16_onnx(model, method, hf_dir, tmp_path, capsys) -> None:
    pytest.importorskip("timm")
    pytest.importorskip("torchvision")
    if model == "hf":
        model = f"hf:{hf_dir}"
    images = write_digits(tmp_path / "imgs", per_class=2, classes=3, size=64)
    pruned, onnx_file = tmp_path / "p.safetensors", tmp_path / "m.onnx"
    common = ["--data", str(images), "--val", str(images), "--calib-images", "4", "--calib-batch", "4"]
    if model.startswith("timm:"):
        # a trained-like checkpoint: timm zero-initialises each block's last BatchNorm scale, and
        # folded all-zero convolutions would be stored once by the exporter
        source = resolve(model).model
        with torch.no_grad():
            for m in source.modules():
                if isinstance(m, torch.nn.BatchNorm2d):
                    m.weight.uniform_(0.5, 1.5)
        checkpoint = tmp_path / "trained.pth"
        torch.save(source.state_dict(), checkpoint)
        common += ["--weights", str(checkpoint)]
    assert main(["prune", "--model", model, *common, *method, "--out", str(pruned), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "top-1 on" in printed and "swapped" in printed
    assert (
        main(
            [
                "export",
                "--model",
                model,
                "--weights",
                str(pruned),
                "--dtype",
                "float16",
                "--out",
                str(onnx_file),
            ]
        )
        == 0
    )
    # Every swapped layer reaches the file as a 2:4 initializer its Conv/Gemm/MatMul reads directly.
    records = {r["layer"]: r for r in read_metadata(onnx_file)["layers"]}
    verdicts = {c.name: c for c in check(str(onnx_file))}
    swapped = sparse_layers(load_model(model, str(pruned)).model)
    assert swapped
    for name in swapped:
        assert records[name]["pattern"] == "2:4", name
        verdict = verdicts[records[name]["initializer"]]
        assert verdict.consumer is not None and verdict.is_24, (name, verdict.reason)
    assert main(["export", "--check", str(onnx_file)]) == 0
    assert "2:4" in capsys.readouterr().out


def test_a_checkpoint_with_its_own_classifier_builds_the_model_to_fit(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    mine = torchvision.models.resnet18(num_classes=3)
    path = tmp_path / "three.pth"
    torch.save(mine.state_dict(), path)
    loaded = load_model("torchvision:resnet18", str(path))
    assert loaded.model.fc.out_features == 3
    x = torch.randn(1, 3, 64, 64)
    torch.testing.assert_close(loaded.model(x), mine.eval()(x))


def test_torchvision_vit_attention_becomes_prunable(tmp_path: Path) -> None:
    torchvision = pytest.importorskip("torchvision")
    torch.manual_seed(0)
    mine = torchvision.models.vit_b_16(num_classes=3).eval()
    path = tmp_path / "vit.pth"
    torch.save(mine.state_dict(), path)
    loaded = load_model("torchvision:vit_b_16", str(path))  # a checkpoint with in_proj_weight keys
    assert not any(isinstance(m, torch.nn.MultiheadAttention) for m in loaded.model.modules())
    x = torch.randn(1, 3, 224, 224)
    torch.testing.assert_close(loaded.model(x), mine(x), rtol=1e-5, atol=1e-5)
