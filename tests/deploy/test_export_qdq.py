"""Q/DQ ONNX of a quantized 2:4 model: the placement (activation Q/DQ right before each
Conv/Gemm/MatMul, int8 weight initializer → DequantizeLinear on the output-channel axis, float
bias), 2:4 seen through the DequantizeLinear by knsparse's checker and by Polygraphy's, ONNX
Runtime CPU against the fake-quantized PyTorch model, and the metadata."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse.deploy.export import check, read_metadata
from knsparse.models import resnet_tiny_digits, vit_tiny_digits
from knsparse.sparse.quantized import quant_layers

onnx = pytest.importorskip("onnx")
ort = pytest.importorskip("onnxruntime")
from onnx import numpy_helper  # noqa: E402


class MLP(nn.Module):
    """Flat input: TorchScript writes each Linear as Gemm(transB=1)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(32, 64), nn.GELU(), nn.Linear(64, 16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


MODELS = {  # name: (builder, input shape)
    "cnn": (resnet_tiny_digits, (1, 8, 8)),  # Conv (BatchNorm folded by the exporter) + Gemm head
    "vit": (vit_tiny_digits, (1, 8, 8)),  # MatMul on [B, T, C] tokens
    "mlp": (MLP, (32,)),  # Gemm
}


def batches(shape: tuple[int, ...], seed: int, n: int = 5, size: int = 16) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, *shape, generator=g) for _ in range(n)]


@pytest.fixture(scope="module", params=sorted(MODELS))
def quantized(request: pytest.FixtureRequest):
    build, shape = MODELS[request.param]
    torch.manual_seed(0)
    pruned = ks.prune(build().eval(), "magnitude", "2:4", progress=False)
    result = ks.quantize(pruned.model, pruned.plan, batches(shape, 0), val=batches(shape, 1, n=2))
    return request.param, pruned, result, shape


def producers(graph) -> dict[str, object]:
    return {o: n for n in graph.node for o in n.output}


def test_qdq_placement_int8_weights_float_bias(quantized, tmp_path: Path) -> None:
    name, pruned, result, shape = quantized
    path = tmp_path / f"{name}.onnx"
    x = batches(shape, 2, n=1, size=4)[0]
    exported = ks.export_onnx(result.model, x, path, plan=pruned.plan)
    proto = onnx.load(str(path))
    inits = {i.name: i for i in proto.graph.initializer}
    made_by = producers(proto.graph)
    records = {r.layer: r for r in exported.layers}
    ops = set()
    for layer_name, layer in quant_layers(result.model).items():
        init = records[layer_name].initializer
        assert init is not None and inits[init].data_type == onnx.TensorProto.INT8, layer_name
        dq_w = next(n for n in proto.graph.node if n.op_type == "DequantizeLinear" and n.input[0] == init)
        (node,) = [n for n in proto.graph.node if dq_w.output[0] in n.input]
        assert node.input[1] == dq_w.output[0] and node.op_type in ("Conv", "Gemm", "MatMul")
        ops.add(node.op_type)
        axis = next(a.i for a in dq_w.attribute if a.name == "axis")
        codes = numpy_helper.to_array(inits[init])
        out_axis = 1 if records[layer_name].transposed else 0
        assert axis == out_axis and codes.shape[out_axis] == layer.weight_q.shape[0], layer_name
        scale = numpy_helper.to_array(inits[dq_w.input[1]])
        assert scale.shape == (layer.weight_q.shape[0],) and np.all(scale > 0)
        # the codes are the layer's (up to the sign of a folded BatchNorm scale), zeros where pruned
        stored = torch.from_numpy(codes.T.copy() if out_axis else codes.copy()).float()
        assert torch.equal(stored.abs(), layer.weight_q.float().abs()), layer_name
        if layer_name in pruned.plan.masks:
            assert torch.all(stored[~pruned.plan.masks[layer_name]] == 0), layer_name
        dq_x = made_by[node.input[0]]  # activation: Q -> DQ right before the operator
        q_x = made_by[dq_x.input[0]]
        assert (dq_x.op_type, q_x.op_type) == ("DequantizeLinear", "QuantizeLinear")
        a_scale = numpy_helper.to_array(inits[q_x.input[1]])
        assert a_scale.shape == () and float(a_scale) == pytest.approx(result.input_scales[layer_name])
        if node.op_type in ("Conv", "Gemm") and len(node.input) > 2:
            assert inits[node.input[2]].data_type == onnx.TensorProto.FLOAT  # bias left float
    assert ops == {"cnn": {"Conv", "Gemm"}, "vit": {"MatMul", "Conv", "Gemm"}, "mlp": {"Gemm"}}[name], ops


def test_check_sees_int8_weights_as_24_through_dequantize(quantized, tmp_path: Path) -> None:
    name, pruned, result, shape = quantized
    path = tmp_path / f"{name}.onnx"
    ks.export_onnx(result.model, batches(shape, 2, n=1, size=4)[0], path, plan=pruned.plan, check=False)
    by_layer = {c.layer: c for c in check(path) if c.layer}
    eligible = 0
    for layer_name, mask in pruned.plan.masks.items():
        verdict = by_layer[layer_name]
        assert verdict.consumer in ("Conv", "Gemm", "MatMul") and verdict.name.endswith("_quantized")
        k = mask.shape[1]  # Cin for a conv (groups of 4 input channels), in_features for a Linear
        if k % 4 == 0:
            assert verdict.is_24, (layer_name, verdict.reason)
            eligible += 1
        else:
            assert "not a multiple of 4" in verdict.reason
    assert eligible >= 2
    # the control: the same model quantized without pruning is dense through the same path
    build, _ = MODELS[name]
    torch.manual_seed(0)
    dense = ks.quantize(build().eval(), None, batches(shape, 0), activation_scale="max")
    ks.export_onnx(dense.model, batches(shape, 2, n=1, size=4)[0], tmp_path / "dense.onnx", check=False)
    dense_checks = [c for c in check(tmp_path / "dense.onnx") if c.consumer]
    assert dense_checks and not any(c.is_24 for c in dense_checks)


def test_polygraphy_sees_24_through_qdq(quantized, tmp_path: Path) -> None:
    """Polygraphy 0.53's checker walks back through Q/DQ like knsparse's, but skips integer
    initializers ("unsupported type"): it confirms 2:4 on the float-weight Q/DQ form
    (``qdq_weights="float"``) and sees no candidate in the int8 form."""
    pytest.importorskip("polygraphy")
    from polygraphy.tools.sparse import SparsityPruner

    _name, pruned, result, shape = quantized
    x = batches(shape, 2, n=1, size=4)[0]
    floats = ks.export_onnx(result.model, x, tmp_path / "f.onnx", plan=pruned.plan, qdq_weights="float")
    pruner = SparsityPruner(onnx.load(str(tmp_path / "f.onnx")))
    pruner.check()
    records = {r.layer: r.initializer for r in floats.layers}
    want = {records[n] for n, m in pruned.plan.masks.items() if m.shape[1] % 4 == 0}
    assert want and want <= pruner.sparse_tensors
    ours = {c.name for c in check(tmp_path / "f.onnx") if c.is_24}
    assert want <= ours  # both checkers agree on the float form
    ks.export_onnx(result.model, x, tmp_path / "i.onnx", plan=pruned.plan, check=False)
    int8 = SparsityPruner(onnx.load(str(tmp_path / "i.onnx")))
    int8.check()
    assert not int8.sparse_tensors


def test_onnx_runtime_agrees_with_fake_quant(quantized, tmp_path: Path) -> None:
    """ORT CPU computes the fake-quantized PyTorch model: fed ORT's activation codes, PyTorch's
    outputs are ORT's within the export's bound (max(1e-4, 2x PyTorch's float32-vs-float64
    fake-quant distance)); PyTorch's own codes, from the same earlier codes, differ from ORT's by
    at most one step in at most 0.1% of the elements; with no flip the outputs agree directly.
    Both stay far from the float model (the Q/DQ nodes really compute)."""
    _name, pruned, result, shape = quantized
    x = batches(shape, 3, n=1, size=8)[0]
    exported = ks.export_onnx(result.model, x, tmp_path / "q.onnx", plan=pruned.plan)
    parity = exported.quant_parity
    assert parity["replay_diff"] <= exported.tolerance and exported.tolerance >= 1e-4
    assert parity["max_step"] <= 1 and parity["flips"] <= 1e-3 * parity["codes"]
    sizes = []  # every quantized layer's input, per sample: the codes compared per sample
    hooks = [
        m.register_forward_pre_hook(lambda _m, a: sizes.append(a[0][0].numel()))
        for m in quant_layers(result.model).values()
    ]
    with torch.no_grad():
        result.model(x)
    for h in hooks:
        h.remove()
    assert exported.batch_sizes_checked == [8, 10]
    assert parity["codes"] == sum(sizes) * (8 + 10)
    session = ort.InferenceSession(str(tmp_path / "q.onnx"), providers=["CPUExecutionProvider"])
    got = torch.from_numpy(session.run(None, {"input": x.numpy()})[0])
    with torch.no_grad():
        fake, flt = result.model(x), pruned.model(x)
    direct = float((got - fake).abs().max())
    if parity["flips"] == 0:
        assert direct <= exported.tolerance
    assert float((got - flt).abs().max()) > 10 * parity["replay_diff"]


def test_fp8_qdq_runs_and_agrees(tmp_path: Path) -> None:
    torch.manual_seed(0)
    pruned = ks.prune(resnet_tiny_digits().eval(), "magnitude", "2:4", progress=False)
    result = ks.quantize(
        pruned.model, pruned.plan, batches((1, 8, 8), 0), dtype="fp8", activation_scale="max"
    )
    exported = ks.export_onnx(result.model, batches((1, 8, 8), 2, n=1, size=4)[0], tmp_path / "f8.onnx")
    assert exported.opset >= 19 and exported.max_abs_diff["CPUExecutionProvider"] <= exported.tolerance
    proto = onnx.load(str(tmp_path / "f8.onnx"))
    types = {i.data_type for i in proto.graph.initializer if i.name.endswith("_quantized")}
    assert types == {onnx.TensorProto.FLOAT8E4M3FN}
    assert read_metadata(tmp_path / "f8.onnx")["quantization"]["dtype"] == "fp8"
    verdicts = [c for c in check(tmp_path / "f8.onnx") if c.layer in pruned.plan.masks]
    assert sum(c.is_24 for c in verdicts) == sum(m.shape[1] % 4 == 0 for m in pruned.plan.masks.values())


def test_metadata_records_the_quantization(quantized, tmp_path: Path) -> None:
    _name, _pruned, result, shape = quantized
    ks.export_onnx(result.model, batches(shape, 2, n=1, size=4)[0], tmp_path / "m.onnx", check=False)
    meta = read_metadata(tmp_path / "m.onnx")["quantization"]
    assert meta["dtype"] == "int8" and meta["weight_initializers"] == "int8"
    assert "per output channel" in meta["weights"] and "per tensor" in meta["activations"]
    assert set(meta["layers"]) == set(result.layers)
    for layer_name, placed in meta["layers"].items():
        assert placed["input_calibration"] == result.activation_scale
        assert placed["input_scale"] == pytest.approx(result.input_scales[layer_name])


def test_bad_arguments(quantized, tmp_path: Path) -> None:
    _name, _pruned, result, shape = quantized
    x = batches(shape, 2, n=1, size=4)[0]
    with pytest.raises(ValueError, match="dtype"):
        ks.export_onnx(result.model, x, tmp_path / "a.onnx", dtype="float16")
    with pytest.raises(ValueError, match="qdq_weights"):
        ks.export_onnx(result.model, x, tmp_path / "b.onnx", qdq_weights="int4")
    assert not (tmp_path / "a.onnx").exists() and not (tmp_path / "b.onnx").exists()


def test_dynamo_exporter_gets_the_same_qdq(tmp_path: Path) -> None:
    """The Q/DQ pass works on the graph either exporter writes (dynamo keeps BatchNorm unfolded)."""
    torch.manual_seed(0)
    pruned = ks.prune(resnet_tiny_digits().eval(), "magnitude", "2:4", progress=False)
    result = ks.quantize(pruned.model, pruned.plan, batches((1, 8, 8), 0), activation_scale="max")
    x = batches((1, 8, 8), 2, n=1, size=4)[0]
    exported = ks.export_onnx(result.model, x, tmp_path / "d.onnx", exporter="dynamo", plan=pruned.plan)
    assert exported.exporter == "dynamo" and exported.quant_parity["flips"] == 0
    assert exported.quant_parity["replay_diff"] <= exported.tolerance
    verdicts = {c.layer: c for c in check(tmp_path / "d.onnx") if c.layer}
    for layer_name, mask in pruned.plan.masks.items():
        assert verdicts[layer_name].name.endswith("_quantized")
        assert verdicts[layer_name].is_24 == (mask.shape[1] % 4 == 0), layer_name
