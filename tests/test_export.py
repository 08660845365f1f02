"""ONNX export (parity, metadata, dynamic batch) and TensorRT 2:4 eligibility of initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from knsparse import tome
from knsparse.export import ParityError, check, check_markdown, export_onnx, read_metadata
from knsparse.masks import apply_masks, from_reduction_view, nm_mask
from knsparse.models import vit_tiny_digits


def _masked(model: nn.Module) -> tuple[nn.Module, dict[str, torch.Tensor]]:
    """2:4-mask every Linear/Conv2d of the blocks/stages (those with input size % 4 == 0)."""
    masks = {
        n: nm_mask(m.weight.abs(), "2:4")
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and n.startswith(("blocks", "layer"))
    }
    apply_masks(model, masks)
    return model.eval(), masks


def test_vit_export_parity_metadata_and_tensorrt_check(tmp_path):
    torch.manual_seed(0)
    model, masks = _masked(vit_tiny_digits())
    perm = torch.randperm(64).tolist()
    result = export_onnx(
        model, torch.randn(2, 1, 8, 8), tmp_path / "vit.onnx", permutations={"blocks.0.attn.qkv": perm}
    )
    assert result.exporter == "torchscript" and result.opset == 17 and result.checker_passed
    assert result.batch_sizes_checked == [2, 4]
    assert result.max_abs_diff["CPUExecutionProvider"] <= 1e-4
    records = {r["layer"]: r for r in read_metadata(result.path)["layers"]}
    assert set(records) == {n for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    assert all(r["initializer"] for r in records.values())
    assert records["blocks.0.attn.qkv"]["permutation"] == perm and records["head"]["permutation"] is None
    assert records["blocks.3.mlp.fc2"]["pattern"] == "2:4" and records["head"]["pattern"] == "dense"
    assert records["blocks.1.mlp.fc1"]["transposed"]  # Linear -> MatMul with a [in, out] constant

    by_layer = {c.layer: c for c in check(result.path) if c.layer}
    assert all(by_layer[n].is_24 for n in masks)
    assert by_layer["patch_embed.proj"].reason == "Cin=1 is not a multiple of 4"
    assert by_layer["head"].reason == "dense: no zeros"
    others = [c for c in check(result.path) if c.consumer is None]
    assert {"cls_token", "pos_embed", "head.bias"} <= {c.name for c in others}
    assert "16 of 18 weight initializers are 2:4" in check_markdown(check(result.path))


def test_dynamo_exporter_folds_batchnorm_and_keeps_the_zeros(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(4, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(), nn.Linear(128, 4)
    ).eval()
    model[1].running_var.uniform_(0.5, 2.0)
    masks = {"0": nm_mask(model[0].weight.abs(), "2:4"), "4": nm_mask(model[4].weight.abs(), "2:4")}
    apply_masks(model, masks)
    result = export_onnx(model, torch.randn(3, 4, 6, 6), tmp_path / "small.onnx", exporter="dynamo")
    assert result.exporter == "dynamo" and result.opset >= 18
    assert result.max_abs_diff["CPUExecutionProvider"] <= 1e-4
    assert all(r.initializer for r in result.layers)
    by_layer = {c.layer: c for c in check(result.path) if c.layer}
    assert by_layer["0"].is_24 and by_layer["4"].is_24


def test_token_merged_vit_exports_with_parity(tmp_path):
    torch.manual_seed(0)
    model = tome.apply(vit_tiny_digits().eval(), 3)
    result = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "tome.onnx")
    assert result.max_abs_diff["CPUExecutionProvider"] <= 1e-4
    assert tome.is_applied(model)


def _graph_file(tmp_path, nodes, inits, name="g.onnx") -> str:
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
        [helper.make_tensor_value_info(n.output[0], TensorProto.FLOAT, None) for n in nodes[-1:]],
        [numpy_helper.from_array(a, k) for k, a in inits.items()],
    )
    path = str(tmp_path / name)
    onnx.save(helper.make_model(graph), path)
    return path


def test_check_reads_the_reduction_axis_of_each_operator(tmp_path):
    torch.manual_seed(0)
    w = torch.randn(8, 16)
    w24 = (w * nm_mask(w.abs(), "2:4")).numpy()  # [N=8, K=16], 2:4 along K
    # A conv weight that is 2:4 along flatten(1) (C,R,S order) but not along (R,S,C).
    crs = nm_mask(torch.randn(4, 16, 3, 3).abs().reshape(4, -1), "2:4").reshape(4, 16, 3, 3)
    conv_crs = (torch.randn(4, 16, 3, 3) * crs).numpy()
    rsc = from_reduction_view(nm_mask(torch.rand(4, 9 * 16), "2:4"), (4, 16, 3, 3))
    conv_rsc = (torch.randn(4, 16, 3, 3) * rsc).numpy()
    nodes = [
        helper.make_node("Gemm", ["x", "gemm_nk"], ["y1"], transB=1),
        helper.make_node("Gemm", ["x", "gemm_kn"], ["y2"], transB=0),
        helper.make_node("Gemm", ["x", "gemm_kn_wrong"], ["y3"], transB=0),
        helper.make_node("Transpose", ["mm_nk"], ["mm_kn"], perm=[1, 0]),
        helper.make_node("MatMul", ["x", "mm_kn"], ["y4"]),
        helper.make_node("Conv", ["x", "conv_crs"], ["y5"]),
        helper.make_node("Conv", ["x", "conv_rsc", "conv_bias"], ["y6"]),
    ]
    inits = {
        "gemm_nk": w24,
        "gemm_kn": np.ascontiguousarray(w24.T),
        "gemm_kn_wrong": w24,  # stored [8, 16] with transB=0: K = 8 along axis 0, not 2:4
        "mm_nk": w24,
        "conv_crs": conv_crs,
        "conv_rsc": conv_rsc,
        "conv_bias": np.zeros(4, np.float32),
    }
    res = {c.name: c for c in check(_graph_file(tmp_path, nodes, inits))}
    assert res["gemm_nk"].is_24 and res["gemm_nk"].reduction_axis == "K = axis 1 (transB=1)"
    assert res["gemm_kn"].is_24 and res["gemm_kn"].reduction_axis == "K = axis 0 (transB=0)"
    assert not res["gemm_kn_wrong"].is_24 and "groups of 4" in res["gemm_kn_wrong"].reason
    assert res["mm_nk"].is_24 and res["mm_nk"].consumer == "MatMul"
    assert not res["conv_crs"].is_24 and res["conv_rsc"].is_24
    assert res["conv_bias"].consumer is None and not res["conv_bias"].is_24


def test_bad_inputs(tmp_path):
    model = vit_tiny_digits()
    x = torch.randn(2, 1, 8, 8)
    with pytest.raises(ValueError, match="opset"):
        export_onnx(model, x, tmp_path / "a.onnx", opset=13)
    with pytest.raises(TypeError, match="fp32"):
        export_onnx(model.half(), x.half(), tmp_path / "a.onnx")
    with pytest.raises(ValueError, match=r"\[B, C, H, W\]"):
        export_onnx(vit_tiny_digits(), torch.randn(8, 8), tmp_path / "a.onnx")
    with pytest.raises(FileNotFoundError, match="no ONNX file"):
        check(tmp_path / "missing.onnx")
    (tmp_path / "junk.onnx").write_bytes(b"not a protobuf at all \xff\xfe")
    with pytest.raises(ValueError, match="not a readable ONNX model"):
        check(tmp_path / "junk.onnx")


class _TracesDifferently(nn.Module):
    """Exports ``2x`` but computes ``3x`` eagerly: the parity check must catch it."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * (2.0 if torch.jit.is_tracing() else 3.0)


def test_parity_failure_raises(tmp_path):
    with pytest.raises(ParityError, match="differs from PyTorch"):
        export_onnx(_TracesDifferently(), torch.ones(1, 1, 2, 2), tmp_path / "bad.onnx")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_gpu_providers_are_checked_when_installed(tmp_path):
    ort = pytest.importorskip("onnxruntime")
    if "CUDAExecutionProvider" not in ort.get_available_providers():
        pytest.skip("onnxruntime has no CUDA provider here (install onnxruntime-gpu)")
    torch.manual_seed(0)
    model, _ = _masked(vit_tiny_digits())
    result = export_onnx(model.cuda(), torch.randn(2, 1, 8, 8, device="cuda"), tmp_path / "gpu.onnx")
    assert result.max_abs_diff["CUDAExecutionProvider"] <= 1e-4
    if "TensorrtExecutionProvider" in ort.get_available_providers():
        assert result.max_abs_diff["TensorrtExecutionProvider"] <= 1e-2


def test_swapped_model_exports_dense_initializers_with_the_zeros(tmp_path):
    from knsparse import swap_modules

    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    masks = {
        n: nm_mask(m.weight.abs(), "4:8")
        for n, m in model.named_modules()
        if isinstance(m, nn.Linear) and n.startswith("blocks")
    }
    swap_modules(model, masks, pattern="4:8")
    result = export_onnx(model, torch.randn(2, 1, 8, 8), tmp_path / "swapped.onnx", dynamic_batch=False)
    assert result.max_abs_diff["CPUExecutionProvider"] <= 1e-4 and result.batch_sizes_checked == [2]
    records = {r.layer: r for r in result.layers}
    assert records["blocks.2.attn.proj"].pattern == "4:8" and records["head"].pattern == "dense"
    by_layer = {c.layer: c for c in check(result.path) if c.layer}
    assert not by_layer["blocks.2.attn.proj"].is_24  # 4:8 is not 2:4 for TensorRT
    assert "groups of 4" in by_layer["blocks.2.attn.proj"].reason
