"""TensorRT 2:4 eligibility of the weights of an ONNX file, and knsparse's metadata in it.

ONNX has no N:M layout: a k:n layer travels as a dense initializer that holds the exact zeros.
TensorRT (and ONNX Runtime's TensorRT provider with ``trt_sparsity_enable``) picks sparse
tensor-core kernels for the initializers that are 2:4 along the reduction axis of the operator
that reads them (the rule NVIDIA Polygraphy's ``inspect sparsity`` codes):

- ``Conv`` weight ``[Cout, Cin, R, S]``: 4 consecutive input channels (axis 1) at each kernel
  position ``(r, s)`` — the (R, S, C) order of :func:`knsparse.core.masks.to_reduction_view`;
- ``Gemm`` B: axis 0 (``[K, N]``), axis 1 with ``transB=1``; A: axis 1, axis 0 with ``transA=1``;
- ``MatMul`` constant B ``[K, N]``: axis 0 (``[..., K, N]``: axis -2); A ``[..., M, K]``: the last.

The weight may reach its operator through ``Identity``, ``Cast``, ``Transpose`` and
``QuantizeLinear``/``DequantizeLinear`` nodes (a ``Transpose`` moves the axis).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from ..core.checks import check_path
from ..core.masks import check_groupable, group_nonzeros, is_nm
from ..core.pattern import Pattern

METADATA_KEY = "knsparse"
# Single-input pass-through ops (only their input 0 carries the weight on).
_PASS_THROUGH_OPS = (
    "Identity",
    "Cast",
    "QuantizeLinear",
    "DequantizeLinear",
    "TRT_FP8QuantizeLinear",
    "TRT_FP8DequantizeLinear",
)
# The operand positions that hold a weight: Gemm A/B, MatMul either side, Conv W (not biases).
_WEIGHT_OPERANDS = {"Gemm": (0, 1), "MatMul": (0, 1), "Conv": (1,)}
_TENSORRT_PATTERN = Pattern(2, 4)


@dataclass(frozen=True)
class InitializerCheck:
    """TensorRT 2:4 eligibility of one ONNX initializer."""

    name: str
    shape: tuple[int, ...]
    consumer: str | None  # "Gemm", "MatMul", "Conv" or None when it is not a GEMM/Conv weight
    reduction_axis: str | None  # human-readable, e.g. "K = axis 1 (transB=1)"
    is_24: bool
    reason: str  # why it is not 2:4 ("" when it is)
    layer: str | None = None  # PyTorch layer, from the file's knsparse metadata


def initializer_arrays(proto) -> dict[str, np.ndarray]:
    """``{name: array}`` of a ModelProto's initializers; bfloat16 (no numpy dtype) as float32,
    which keeps every zero."""
    from onnx import numpy_helper

    out = {}
    for init in proto.graph.initializer:
        arr = numpy_helper.to_array(init)
        out[init.name] = arr if arr.dtype.kind in "fiub" else arr.astype(np.float32)
    return out


def load_model(path: str | Path, load_external_data: bool = True):
    """The ``onnx.ModelProto`` of the file at ``path``: ``FileNotFoundError`` when there is no
    file, ``ValueError`` naming it when it is not an ONNX model — unreadable (another format,
    random bytes, truncated mid-message) or readable as protobuf but without what every ONNX
    model has (an IR version, a graph, an opset): an empty file, a cut at a field boundary, a
    protobuf of another kind. A model without initializers is a model."""
    import onnx

    path = Path(check_path(path, "path"))
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    try:
        proto = onnx.load(str(path), load_external_data=load_external_data)
    except Exception as exc:  # onnx raises DecodeError and others on a corrupt file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise ValueError(f"{path} is not a readable ONNX model: {first}") from exc
    missing = [
        what
        for what, present in (
            ("IR version", proto.ir_version > 0),
            ("graph", proto.HasField("graph")),
            ("opset import", len(proto.opset_import) > 0),
        )
        if not present
    ]
    if missing:
        size = path.stat().st_size
        kind = "an empty file" if size == 0 else f"{size} bytes"
        raise ValueError(f"{path} is not an ONNX model ({kind}): it has no {', no '.join(missing)}")
    return proto


def _metadata(proto) -> dict:
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}


def read_metadata(path: str | Path) -> dict:
    """The ``"knsparse"`` metadata of an exported file (``{}`` if it has none); the errors of
    :func:`load_model` when ``path`` is not an ONNX model."""
    return _metadata(load_model(path, load_external_data=False))


def _consumers(graph) -> dict[str, list[tuple[object, int, list[int] | None]]]:
    """initializer name -> [(GEMM/Conv node, input index, axes permutation applied on the way)]."""
    by_input: dict[str, list[tuple[object, int]]] = {}
    for node in graph.node:
        for idx, name in enumerate(node.input):
            by_input.setdefault(name, []).append((node, idx))
    found: dict[str, list] = {}
    for init in graph.initializer:
        frontier: list[tuple[str, list[int] | None]] = [(init.name, None)]
        while frontier:
            tensor, perm = frontier.pop()
            for node, idx in by_input.get(tensor, []):
                if idx in _WEIGHT_OPERANDS.get(node.op_type, ()):
                    found.setdefault(init.name, []).append((node, idx, perm))
                elif idx != 0:
                    continue
                elif node.op_type == "Transpose":
                    attr = {a.name: list(a.ints) for a in node.attribute}
                    step = attr.get("perm") or list(range(len(init.dims)))[::-1]
                    frontier.append((node.output[0], step if perm is None else [perm[i] for i in step]))
                elif node.op_type in _PASS_THROUGH_OPS:
                    frontier.append((node.output[0], perm))
    return found


def _reduction_rows(arr: np.ndarray, node, idx: int) -> tuple[torch.Tensor, str] | str:
    """``[rows, K]`` view with the reduction axis last and its description, or why there is none."""
    t = torch.from_numpy(np.array(arr, copy=True))
    attrs = {a.name: a.i for a in node.attribute}
    if node.op_type == "Conv":
        if t.dim() != 4:
            return f"Conv weight of rank {t.dim()} (only 2-D convolutions are checked)"
        return t, "Cin, 4 consecutive input channels at each (r, s)"
    if node.op_type == "Gemm":
        flag = "transB" if idx == 1 else "transA"
        trans = attrs.get(flag, 0)
        # B is [K, N] (K first) unless transposed; A is [M, K] (K last) unless transposed.
        k_axis = int(trans) if idx == 1 else 1 - int(trans)
        return (t if k_axis == 1 else t.T), f"K = axis {k_axis} ({flag}={trans})"
    if t.dim() < 2:
        return "1-D MatMul operand"
    if idx == 1:
        return t.transpose(-1, -2).reshape(-1, t.shape[-2]), f"K = axis {t.dim() - 2} ([..., K, N])"
    return t.reshape(-1, t.shape[-1]), f"K = axis {t.dim() - 1} ([..., M, K])"


def _check_one(name: str, arr: np.ndarray, uses: list) -> InitializerCheck:
    shape = tuple(int(d) for d in arr.shape)
    if not uses:
        return InitializerCheck(name, shape, None, None, False, "not a Gemm/MatMul/Conv weight")
    verdicts = []
    for node, idx, perm in uses:
        stored = arr if perm is None else np.transpose(arr, perm)
        view = _reduction_rows(stored, node, idx)
        if isinstance(view, str):
            verdicts.append(InitializerCheck(name, shape, node.op_type, None, False, view))
            continue
        tensor, axis = view
        verdicts.append(InitializerCheck(name, shape, node.op_type, axis, *_verdict_24(tensor)))
    # An initializer used twice is eligible only if every use is.
    return next((v for v in verdicts if not v.is_24), verdicts[0])


def _verdict_24(t: torch.Tensor) -> tuple[bool, str]:
    """(is 2:4, why not) for a ``[rows, K]`` view or a 4-D conv weight grouped (R, S, C)."""
    pattern = _TENSORRT_PATTERN
    try:
        check_groupable(t.shape, pattern)
    except ValueError:
        what = "Cin" if t.dim() == 4 else "K"
        return False, f"{what}={t.shape[1]} is not a multiple of {pattern.n}"
    if is_nm(t, pattern):
        return True, ""
    counts = group_nonzeros(t, pattern)
    bad = float((counts > pattern.k).float().mean())
    if not bool((t == 0).any()):
        return False, "dense: no zeros"
    zeros = float((t == 0).float().mean())
    return (
        False,
        f"{100 * bad:.1f}% of groups of {pattern.n} keep more than {pattern.k} ({100 * zeros:.1f}% zeros)",
    )


def check(path: str | Path) -> list[InitializerCheck]:
    """Every initializer of the ONNX file at ``path`` and whether TensorRT sees it as 2:4.

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` naming it if it is
    not an ONNX model (:func:`load_model`): an empty list means a model without initializers,
    never a file that could not be read.
    """
    proto = load_model(path)
    owners = {
        r["initializer"]: r["layer"] for r in _metadata(proto).get("layers", []) if r.get("initializer")
    }
    uses = _consumers(proto.graph)
    out = []
    for name, arr in initializer_arrays(proto).items():
        verdict = _check_one(name, arr, uses.get(name, []))
        out.append(InitializerCheck(**{**asdict(verdict), "layer": owners.get(name)}))
    return out


def check_markdown(checks: Sequence[InitializerCheck], weights_only: bool = True) -> str:
    """A markdown table of :func:`check` results (GEMM/Conv weights only by default)."""
    rows = [c for c in checks if c.consumer is not None or not weights_only]
    n24 = sum(c.is_24 for c in rows)
    kind = "weight initializers" if weights_only else "initializers"
    lines = [
        f"{n24} of {len(rows)} {kind} are 2:4 along TensorRT's reduction axis",
        "",
        "| initializer | layer | shape | op | reduction axis | 2:4 | why not |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for c in rows:
        lines.append(
            f"| {c.name} | {c.layer or ''} | {list(c.shape)} | {c.consumer or ''} | {c.reduction_axis or ''} "
            f"| {'yes' if c.is_24 else 'no'} | {c.reason} |"
        )
    return "\n".join(lines)
