"""Issue 24 item 5: bad input that used to pass silently or end in a raw error deep inside
torch now ends in one ``ValueError`` naming the file, layer or argument, with the model untouched:

- ``check`` / ``read_metadata`` on a file that is not an ONNX model (an empty list read as
  "nothing wrong"), and ``knsparse export --check`` on it;
- a layer on the meta device passed to the stages that read or write weights;
- ``macs`` / ``audit`` with an ``input_shape`` the model cannot take;
- ``knsparse`` without a command.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

import knsparse as ks
from knsparse.cli import main
from knsparse.core.layers import pattern_layers
from knsparse.core.masks import apply_masks
from knsparse.deploy.onnx_check import check, read_metadata
from knsparse.models import resnet_tiny_digits, vit_tiny_digits
from knsparse.sparse.io import load_sparse, save_sparse

onnx = pytest.importorskip("onnx")
from onnx import TensorProto, helper  # noqa: E402


def _gemm_model() -> onnx.ModelProto:
    """A real one-Gemm ONNX model with one 2:4 weight initializer."""
    weight = (torch.arange(32, dtype=torch.float32).reshape(4, 8) + 1) * torch.tensor([1.0, 1, 0, 0] * 2)
    graph = helper.make_graph(
        [helper.make_node("Gemm", ["x", "w"], ["y"], transB=1)],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor("w", TensorProto.FLOAT, [4, 8], weight.flatten().tolist())],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])


def _png() -> bytes:
    matplotlib = pytest.importorskip("matplotlib")
    matplotlib.use("Agg")
    import io

    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(1, 1))
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def _field_boundary_cut() -> bytes:
    """The model cut right after its graph: protobuf parses it, the opset import is gone."""
    full = _gemm_model().SerializeToString()
    head = onnx.ModelProto()
    head.ir_version = _gemm_model().ir_version
    head.graph.CopyFrom(_gemm_model().graph)
    prefix = head.SerializeToString()
    assert full.startswith(prefix) and len(prefix) < len(full)  # fields serialize in number order
    return prefix


def _write(tmp: Path, kind: str) -> Path:
    full = _gemm_model().SerializeToString()
    path = tmp / f"{kind}.onnx"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated-half":
        path.write_bytes(full[: len(full) // 2])
    elif kind == "truncated-last-byte":
        path.write_bytes(full[:-1])
    elif kind == "truncated-at-field":
        path.write_bytes(_field_boundary_cut())
    elif kind == "png":
        path.write_bytes(_png())
    elif kind == "torch-save":
        torch.save({"w": torch.randn(4, 8)}, path)
    elif kind == "safetensors":
        save_file({"w": torch.randn(4, 8)}, str(path))
    elif kind == "random-bytes":
        path.write_bytes(
            torch.randint(0, 256, (4096,), generator=torch.Generator().manual_seed(0))
            .byte()
            .numpy()
            .tobytes()
        )
    elif kind == "protobuf-without-graph":
        path.write_bytes(onnx.ModelProto(ir_version=8, producer_name="x").SerializeToString())
    elif kind == "tensor-protobuf":
        path.write_bytes(helper.make_tensor("w", TensorProto.FLOAT, [2], [1.0, 2.0]).SerializeToString())
    return path


NOT_ONNX = [
    "empty",
    "truncated-half",
    "truncated-last-byte",
    "truncated-at-field",
    "png",
    "torch-save",
    "safetensors",
    "random-bytes",
    "protobuf-without-graph",
    "tensor-protobuf",
]


@pytest.mark.parametrize("kind", NOT_ONNX)
def test_check_refuses_a_file_that_is_not_an_onnx_model(tmp_path, kind):
    path = _write(tmp_path, kind)
    with pytest.raises(ValueError, match="not (a readable|an) ONNX model") as err:
        check(path)
    assert str(path) in str(err.value)
    with pytest.raises(ValueError, match="not (a readable|an) ONNX model"):
        read_metadata(path)


@pytest.mark.parametrize("kind", ["empty", "truncated-half", "png", "protobuf-without-graph"])
def test_export_check_command_says_so_in_one_line(tmp_path, kind, capsys):
    path = _write(tmp_path, kind)
    assert main(["export", "--check", str(path)]) == 2
    out, err = capsys.readouterr()
    assert out == ""
    assert err.count("\n") == 1 and str(path) in err and "ONNX model" in err and "Traceback" not in err


def test_a_real_model_reads_and_one_without_initializers_is_an_empty_list(tmp_path):
    good = tmp_path / "gemm.onnx"
    onnx.save(_gemm_model(), str(good))
    (found,) = check(good)
    assert (found.name, found.consumer, found.is_24) == ("w", "Gemm", True)
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["y"])],
        "relu",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 4])],
    )
    bare = tmp_path / "relu.onnx"
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)]), str(bare))
    assert check(bare) == [] and read_metadata(bare) == {}


# ---- a layer on the meta device -----------------------------------------------------------------

META_LAYER = "blocks.0.mlp.fc1"


def _vit(where: str) -> torch.nn.Module:
    torch.manual_seed(0)
    if where == "all":
        with torch.device("meta"):
            return vit_tiny_digits().eval()
    model = vit_tiny_digits().eval()
    if where == "one-layer":
        model.get_submodule(META_LAYER).to("meta")
    return model


def _masks(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    layers, _ = pattern_layers(model, ks.Pattern.parse("2:4"))
    gen = torch.Generator().manual_seed(0)
    return {n: ks.nm_mask(torch.rand(m.weight.shape, generator=gen), "2:4") for n, m in layers.items()}


def _snapshot(model: torch.nn.Module) -> list[tuple[str, str, tuple, str, torch.Tensor | None]]:
    """Every module's type and every tensor's shape, device and (real tensors) values."""
    types = [(n, type(m).__name__, (), "", None) for n, m in model.named_modules()]
    tensors = [
        (k, "", tuple(v.shape), str(v.device), None if v.is_meta else v.detach().clone())
        for k, v in model.state_dict().items()
    ]
    return types + tensors


def _same(a, b) -> bool:
    return len(a) == len(b) and all(
        x[:4] == y[:4] and (x[4] is None) == (y[4] is None) and (x[4] is None or torch.equal(x[4], y[4]))
        for x, y in zip(a, b, strict=True)
    )


STAGES = {
    "prune": lambda m, tmp: ks.prune(m, method="magnitude", pattern="2:4", inplace=True, progress=False),
    "swap_modules": lambda m, tmp: ks.swap_modules(m, _masks(m)),
    "audit": lambda m, tmp: ks.audit(
        m, (1, 8, 8), batch_sizes=(1,), plan=_masks(m), warmup=0, repeats=1, min_time_s=0, progress=False
    ),
    "export_onnx": lambda m, tmp: ks.export_onnx(m, torch.randn(1, 1, 8, 8), tmp / "m.onnx"),
    "permute": lambda m, tmp: ks.permute(m, "2:4"),
    "apply_masks": lambda m, tmp: apply_masks(m, _masks(m)),
    "save_sparse": lambda m, tmp: save_sparse(m, tmp / "m.safetensors"),
    "load_sparse": lambda m, tmp: load_sparse(m, tmp / "never-read.safetensors"),
    "repair.asr": lambda m, tmp: ks.repair.asr(m, _vit("none"), [torch.randn(2, 1, 8, 8)]),
    "repair.recalibrate_bn": lambda m, tmp: ks.repair.recalibrate_bn(m, [torch.randn(2, 1, 8, 8)]),
    "finetune": lambda m, tmp: ks.finetune(m, _vit("none"), [torch.randn(2, 1, 8, 8)], epochs=1),
}


@pytest.mark.parametrize("where", ["one-layer", "all"])
@pytest.mark.parametrize("stage", sorted(STAGES))
def test_a_layer_on_the_meta_device_is_named_before_anything_changes(stage, where, tmp_path):
    model = _vit(where)
    before = _snapshot(model)
    named = repr(META_LAYER) if where == "one-layer" else "the model"
    arg = "student" if stage == "finetune" else "model"
    with pytest.raises(ValueError, match=rf"{arg}: (layer )?{named} .*is on the meta device.*no data"):
        STAGES[stage](model, tmp_path)
    assert _same(_snapshot(model), before)
    assert not list(tmp_path.iterdir())  # nothing written


def test_macs_counts_a_whole_meta_model_like_the_real_one_and_refuses_a_mix():
    real = ks.macs(_vit("none"), (1, 8, 8))
    shapes_only = ks.macs(_vit("all"), (1, 8, 8))
    assert shapes_only.dense_total == real.dense_total > 0
    mixed = _vit("one-layer")
    before = _snapshot(mixed)
    with pytest.raises(ValueError, match=rf"layer {META_LAYER!r} \(Linear\) is on the meta device while"):
        ks.macs(mixed, (1, 8, 8))
    assert _same(_snapshot(mixed), before)


# ---- an input_shape the model cannot take -------------------------------------------------------

WRONG_SHAPES = [
    # (model, input_shape, what the message names: the layer or the forward that raised)
    ("resnet", (3, 8, 8), r"layer 'conv1' \(Conv2d\) raised RuntimeError: .*3 channels"),
    ("vit", (1, 16, 16), r"the model's own forward \(VisionTransformer\) raised RuntimeError: .*size"),
    ("vit", (2, 3, 8, 8), r"layer 'patch_embed.proj' \(Conv2d\) raised RuntimeError: .*3 channels"),
    ("vit", (8, 8), r"must be \(C, H, W\) or \(B, C, H, W\), got \(8, 8\)"),
    ("resnet", (1, 1, 1, 8, 8), r"must be \(C, H, W\) or \(B, C, H, W\), got \(1, 1, 1, 8, 8\)"),
]


def _model(kind: str) -> torch.nn.Module:
    torch.manual_seed(0)
    return (resnet_tiny_digits() if kind == "resnet" else vit_tiny_digits()).eval()


@pytest.mark.parametrize("call", ["macs", "audit"])
@pytest.mark.parametrize(
    ("kind", "shape", "names"), WRONG_SHAPES, ids=[f"{k}{s}" for k, s, _ in WRONG_SHAPES]
)
def test_an_input_shape_the_model_cannot_take_is_named(call, kind, shape, names):
    model = _model(kind)
    before = _snapshot(model)
    with pytest.raises(ValueError, match="input_shape") as err:
        if call == "macs":
            ks.macs(model, shape)
        else:
            ks.audit(model, shape, batch_sizes=(1,), plan=_masks(model), warmup=0, repeats=1, progress=False)
    message = str(err.value)
    assert str(tuple(shape)) in message, message
    assert re.search(names, message), message
    assert _same(_snapshot(model), before)


def test_the_right_input_shape_still_counts_and_audits():
    model = _model("resnet")
    assert ks.macs(model, (1, 8, 8)).dense_total > 0
    result = ks.audit(
        model, (1, 8, 8), batch_sizes=(1,), plan=_masks(model), warmup=0, repeats=1, progress=False
    )
    assert result.max_abs_diff < 1e-4


# ---- knsparse without a command -----------------------------------------------------------------


def _console_script() -> list[str]:
    script = Path(sys.executable).with_name("knsparse")
    if script.is_file():
        return [str(script)]
    return [sys.executable, "-P", "-c", "import sys; from knsparse.cli import main; sys.exit(main())"]


@pytest.mark.parametrize(
    "command", [_console_script(), [sys.executable, "-P", "-m", "knsparse"]], ids=["script", "-m"]
)
def test_knsparse_without_a_command_prints_usage_and_exits_2(command):
    run = subprocess.run(command, capture_output=True, text=True, timeout=120, cwd=Path(__file__).parent)
    assert run.returncode == 2, run.stderr
    assert run.stdout == ""
    lines = run.stderr.splitlines()
    assert (
        lines[0].startswith("usage: knsparse ") and "{prune,finetune,inspect,export,audit,demo}" in lines[0]
    )
    assert lines[-1].startswith("knsparse: error: ") and "required" in lines[-1]
    assert "Traceback" not in run.stderr
