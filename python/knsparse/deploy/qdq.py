"""Q/DQ ONNX for TensorRT's explicit quantization, written around an exported float graph.

The model is exported with every fake-quantized layer as its float twin (the dequantized
weight; :func:`knsparse.sparse.quantized.float_copy`), then each quantized layer's operator gets
the placement TensorRT's explicit-quantization guide prescribes for a weighted layer:

- its data input through ``QuantizeLinear → DequantizeLinear`` right before it (per tensor: a
  scalar scale and a zero point of 0 of the quantized type);
- its weight as a quantized initializer → ``DequantizeLinear`` → the operator (per output
  channel: ``Conv`` weight ``[K, C, R, S]`` and ``Gemm`` B ``[N, K]`` (``transB=1``) on axis 0,
  ``MatMul`` B ``[K, N]`` on axis 1), or with ``weights="float"`` the dequantized float
  initializer → ``QuantizeLinear → DequantizeLinear`` (TensorRT quantizes it with that scale at
  build time; the form Polygraphy's sparsity checker reads, which skips integer initializers);
- the bias (an ``Add`` after ``MatMul``, or the third ``Gemm``/``Conv`` input) left in float.

Zero is a code of every quantized type, so the quantized initializers hold the plan's exact
zeros in the layout of the operator that reads them (the k:n pattern on TensorRT's reduction
axis, which :func:`knsparse.deploy.onnx_check.check` reads through the ``DequantizeLinear``).
int8 needs opset >= 13 (per-axis ``DequantizeLinear``); float8 e4m3 needs opset >= 19.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
from torch import nn

from ..core.quant import QMAX

QDQ_WEIGHTS = ("int8", "float")
"""How a quantized weight is written: its codes (an int8 / e4m3 initializer → DequantizeLinear),
or ``"float"``: the dequantized float initializer → QuantizeLinear → DequantizeLinear."""

_WEIGHT_INPUT = {"Conv": 1, "Gemm": 1, "MatMul": 1}
MIN_OPSET = {"int8": 13, "fp8": 19}


def _onnx_type(dtype: str) -> int:
    from onnx import TensorProto

    return TensorProto.INT8 if dtype == "int8" else TensorProto.FLOAT8E4M3FN


def _codes_tensor(name: str, codes: torch.Tensor, dtype: str):
    """An ONNX initializer holding ``codes`` (int8, or e4m3 bytes) in their own shape."""
    from onnx import helper, numpy_helper

    if dtype == "int8":
        return numpy_helper.from_array(codes.detach().cpu().numpy().astype(np.int8), name)
    raw = codes.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes()
    return helper.make_tensor(name, _onnx_type(dtype), list(codes.shape), raw, raw=True)


def _zero_point(name: str, shape: Sequence[int], dtype: str):
    return _codes_tensor(name, torch.zeros(tuple(shape), dtype=torch.float32).to(_storage(dtype)), dtype)


def _storage(dtype: str) -> torch.dtype:
    return torch.int8 if dtype == "int8" else torch.float8_e4m3fn


def _consumer(graph, init: str, layer: str) -> int:
    """The index of the one Conv/Gemm/MatMul node that reads initializer ``init`` as its weight."""
    users = [(k, n, i) for k, n in enumerate(graph.node) for i, x in enumerate(n.input) if x == init]
    ops = [k for k, n, i in users if _WEIGHT_INPUT.get(n.op_type) == i]
    if len(ops) != 1 or len(users) != 1:
        kinds = [f"{n.op_type}[{i}]" for _, n, i in users]
        raise RuntimeError(
            f"layer {layer!r}: its weight {init!r} is read by {kinds or 'no node'}, not by exactly one "
            "Conv/Gemm/MatMul: cannot place Q/DQ"
        )
    return ops[0]


def _folded_codes(
    stored: np.ndarray, codes: torch.Tensor, scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Codes and per-channel scales for an initializer that holds the dequantized weight times a
    per-output-channel factor ``f`` (the exporter folds an eval-mode BatchNorm into the Conv
    before it): scale ``s · |f|``, codes negated where ``f < 0`` (exact: the codes are symmetric)
    and zeroed where ``f = 0``. ``f = 1`` for an unfolded weight. ``stored`` and ``codes`` are in
    the layer's own ``[out, ...]`` layout."""
    deq = (codes.float() * scale.reshape(-1, *([1] * (codes.dim() - 1)))).reshape(codes.shape[0], -1).double()
    folded = torch.from_numpy(np.asarray(stored, dtype=np.float64)).reshape(deq.shape)
    denom = (deq * deq).sum(1)
    factor = torch.where(denom > 0, (folded * deq).sum(1) / denom.clamp_min(1e-300), torch.ones_like(denom))
    sign = torch.sign(factor).reshape(-1, *([1] * (codes.dim() - 1)))
    new_codes = (codes.float() * sign).to(codes.dtype)
    new_scale = torch.where(factor != 0, scale.double() * factor.abs(), scale.double()).float()
    return new_codes, new_scale


def _weight_axis(node, transposed: bool) -> int:
    """The per-output-channel axis of the weight as the node reads it."""
    if node.op_type == "MatMul":
        return 1 if transposed else 0  # B [K, N]: output channels on axis 1
    if node.op_type == "Gemm":
        trans_b = next((a.i for a in node.attribute if a.name == "transB"), 0)
        return 0 if trans_b else 1
    return 0  # Conv [K, C, R, S]


def insert_qdq(
    proto,
    layers: Mapping[str, nn.Module],
    records: Sequence[object],
    weights: str = "int8",
) -> dict[str, dict[str, object]]:
    """Rewrite ``proto`` (in place) with Q/DQ around every quantized layer of ``layers``
    (``{name: QuantLinear | QuantConv2d}``) whose initializer ``records`` found.

    Returns ``{layer: {"op", "weight_axis", "input_scale", "weight_initializer"}}``. A quantized
    layer whose weight is not a constant read by exactly one Conv/Gemm/MatMul is a
    ``RuntimeError`` naming it (the file would not be what the PyTorch model computes).
    """
    from onnx import helper, numpy_helper

    graph = proto.graph
    by_layer = {r.layer: r for r in records}
    before: dict[int, list] = {}  # node index -> Q/DQ nodes to put right before it
    drop: set[str] = set()
    placed: dict[str, dict[str, object]] = {}
    for name, layer in layers.items():
        record = by_layer.get(name)
        if record is None or record.initializer is None:
            raise RuntimeError(f"layer {name!r}: its weight was not found as an ONNX initializer")
        dtype = layer.dtype_name
        init = record.initializer
        index = _consumer(graph, init, name)
        node = graph.node[index]
        axis = _weight_axis(node, record.transposed)
        stored = numpy_helper.to_array(next(i for i in graph.initializer if i.name == init))
        codes, scale_t = _folded_codes(
            stored.T if record.transposed else stored,
            layer.weight_q.detach().cpu(),
            layer.weight_scale.detach().cpu().float(),
        )
        codes = codes.T if record.transposed else codes
        out_ch = int(layer.weight_q.shape[0])
        scale = scale_t.numpy().reshape(out_ch)
        w_scale, w_zero = f"{init}_scale", f"{init}_zero_point"
        graph.initializer.extend(
            [numpy_helper.from_array(scale, w_scale), _zero_point(w_zero, [out_ch], dtype)]
        )
        nodes = []
        deq_w = f"{init}_dequantized"
        if weights == "int8":
            q_init = f"{init}_quantized"
            graph.initializer.append(_codes_tensor(q_init, codes, dtype))
            drop.add(init)
            nodes.append(helper.make_node("DequantizeLinear", [q_init, w_scale, w_zero], [deq_w], axis=axis))
        else:
            q_w = f"{init}_q"
            nodes.append(helper.make_node("QuantizeLinear", [init, w_scale, w_zero], [q_w], axis=axis))
            nodes.append(helper.make_node("DequantizeLinear", [q_w, w_scale, w_zero], [deq_w], axis=axis))
        node.input[1] = deq_w
        x = node.input[0]
        a_scale, a_zero = f"{name}.input_scale", f"{name}.input_zero_point"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.array(float(layer.input_scale), dtype=np.float32), a_scale),
                _zero_point(a_zero, [], dtype),
            ]
        )
        q_x, dq_x = f"{name}.input_quantized", f"{name}.input_dequantized"
        nodes.append(helper.make_node("QuantizeLinear", [x, a_scale, a_zero], [q_x]))
        nodes.append(helper.make_node("DequantizeLinear", [q_x, a_scale, a_zero], [dq_x]))
        node.input[0] = dq_x
        before[index] = nodes
        placed[name] = {
            "op": node.op_type,
            "weight_axis": axis,
            "input_scale": float(layer.input_scale),
            "input_calibration": getattr(layer, "input_calibration", None),
            "weight_initializer": f"{init}_quantized" if weights == "int8" else init,
            "qmax": QMAX[dtype],
        }
    ordered = []
    for k, node in enumerate(graph.node):
        ordered.extend(before.get(k, []))
        ordered.append(node)
    del graph.node[:]
    graph.node.extend(ordered)
    kept = [i for i in graph.initializer if i.name not in drop]
    del graph.initializer[:]
    graph.initializer.extend(kept)
    return placed
