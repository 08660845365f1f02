"""ONNX export of (sparse) models and the TensorRT 2:4 eligibility check of an ONNX file.

ONNX has no N:M layout: a k:n layer travels as a dense initializer that holds the exact
zeros, consumed by a standard ``MatMul``/``Gemm``/``Conv``. TensorRT (and ONNX Runtime's
TensorRT provider with ``trt_sparsity_enable``) then picks sparse tensor-core kernels for the
initializers that are 2:4 along its reduction axis:

- ``Gemm`` B operand: K as stored (``[N, K]`` with ``transB=1``, ``[K, N]`` without);
- ``MatMul`` constant operand ``[..., K, N]``: K is the second-to-last axis;
- ``Conv`` weight ``[Cout, Cin, R, S]``: 4 consecutive input channels at each kernel
  position ``(r, s)`` — the (R, S, C) order of :func:`knsparse.masks.to_reduction_view`.

``export_onnx`` records which initializer each PyTorch layer became, its pattern and its
applied channel permutation in the model's ``metadata_props`` (key ``"knsparse"``).
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .densify import dense_copy
from .masks import check_groupable, group_nonzeros, is_nm
from .modules import SparseConv2d, SparseLinear
from .pattern import Pattern
from .provenance import package_version

METADATA_KEY = "knsparse"
_PASS_THROUGH_OPS = ("Identity", "Cast")
# The operand positions that hold a weight: Gemm A/B, MatMul either side, Conv W (not biases).
_WEIGHT_OPERANDS = {"Gemm": (0, 1), "MatMul": (0, 1), "Conv": (1,)}
_TWO_GB = 2**31
_TENSORRT_PATTERN = Pattern(2, 4)


class ParityError(RuntimeError):
    """ONNX Runtime's output differs from PyTorch's by more than the tolerance."""


@dataclass(frozen=True)
class LayerRecord:
    """Where one PyTorch weight layer ended up in the ONNX graph."""

    layer: str
    initializer: str | None  # None: not found as a constant (e.g. folded into another op)
    transposed: bool  # stored as the transpose of the PyTorch weight (Linear -> MatMul [in, out])
    pattern: str  # "2:4" / "k:n" when the weight satisfies it, else "dense"
    permutation: list[int] | None


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and measured."""

    path: str
    exporter: str
    opset: int
    layers: list[LayerRecord]
    checker_passed: bool | None = None
    # provider -> max |ORT - PyTorch| over the checked batch sizes
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    batch_sizes_checked: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


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


# ----------------------------------------------------------------------------- export


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and n}


def _layer_pattern(weight: torch.Tensor, module: nn.Module) -> str:
    declared = getattr(module, "pattern", None)
    if declared is not None:
        return str(declared)
    if bool((weight == 0).any()) and is_nm(weight, "2:4"):
        return "2:4"
    return "dense"


def _match_initializer(
    weight: np.ndarray, inits: Mapping[str, np.ndarray], used: set[str]
) -> tuple[str | None, bool]:
    """The initializer holding ``weight`` as-is or transposed, up to a per-output-channel scale.

    The scale allows exporters that fold BatchNorm into the preceding Conv.
    """
    rows = weight.reshape(weight.shape[0], -1).astype(np.float64)
    for name, arr in inits.items():
        if name in used:
            continue
        for transposed in (False, True):
            cand = arr.T if transposed else arr
            if cand.shape != weight.shape:
                continue
            c = cand.reshape(rows.shape).astype(np.float64)
            denom = (rows * rows).sum(1)
            scale = np.divide((c * rows).sum(1), denom, out=np.ones_like(denom), where=denom > 0)
            if np.allclose(c, rows * scale[:, None], rtol=1e-5, atol=1e-7):
                return name, transposed
    return None, False


def _load_initializers(proto) -> dict[str, np.ndarray]:
    from onnx import numpy_helper

    return {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}


def _torch_export(
    model: nn.Module, x: torch.Tensor, path: Path, opset: int, dynamic_batch: bool, exporter: str
) -> tuple[str, int]:
    """Run one of torch's exporters; returns (exporter used, opset written)."""
    names = {"input_names": ["input"], "output_names": ["output"]}
    if exporter == "torchscript":
        axes = {"input": {0: "batch"}, "output": {0: "batch"}} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
            torch.onnx.export(
                model, (x,), str(path), opset_version=opset, dynamo=False, dynamic_axes=axes, **names
            )
        return exporter, opset
    # torch's dynamo exporter implements opset >= 18 and converts down only on request.
    opset = max(opset, 18)
    shapes = ({0: torch.export.Dim("batch", min=1)},) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            (x,),
            str(path),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=shapes,
            verbose=False,
            external_data=False,
            **names,
        )
    return exporter, opset


def _run_providers(path: Path) -> list[tuple[str, list]]:
    """(label, providers) for every ONNX Runtime provider worth checking on this machine."""
    import onnxruntime as ort

    available = set(ort.get_available_providers())
    runs = [("CPUExecutionProvider", ["CPUExecutionProvider"])]
    if "CUDAExecutionProvider" in available:
        runs.append(("CUDAExecutionProvider", [("CUDAExecutionProvider", {"use_tf32": 0})]))
    if "TensorrtExecutionProvider" in available:
        cache = str(path.parent / f".{path.stem}.trt_cache")
        trt = {"trt_sparsity_enable": True, "trt_engine_cache_enable": True, "trt_engine_cache_path": cache}
        runs.append(
            ("TensorrtExecutionProvider", [("TensorrtExecutionProvider", trt), "CUDAExecutionProvider"])
        )
    return runs


def _parity(
    model: nn.Module, path: Path, x: torch.Tensor, batch_sizes: Sequence[int], result: ExportResult
) -> None:
    import onnxruntime as ort

    g = torch.Generator().manual_seed(0)
    inputs = [x] + [torch.randn((b, *x.shape[1:]), generator=g).to(x.device) for b in batch_sizes[1:]]
    with torch.no_grad():
        expected = [model(xi).float().cpu().numpy() for xi in inputs]
    for label, providers in _run_providers(path):
        session = ort.InferenceSession(str(path), providers=providers)
        diff = 0.0
        for xi, ref in zip(inputs, expected, strict=True):
            out = session.run(None, {"input": xi.detach().float().cpu().numpy()})[0]
            diff = max(diff, float(np.abs(out - ref).max()))
        result.max_abs_diff[label] = diff
    result.batch_sizes_checked = [int(xi.shape[0]) for xi in inputs]


def export_onnx(
    model: nn.Module,
    example_input: torch.Tensor,
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    permutations: Mapping[str, Sequence[int]] | None = None,
    exporter: str = "auto",
    tolerance: float = 1e-4,
) -> ExportResult:
    """Export ``model`` (dense, masked or swapped to sparse modules) to ONNX.

    Args:
        model: an fp32 ``nn.Module`` (left untouched; a deep copy in eval mode is exported,
            with SparseLinear/SparseConv2d turned into Linear/Conv2d holding the exact zeros).
        example_input: ``[B, C, H, W]`` fp32 tensor on the model's device.
        path: the ``.onnx`` file to write (parent directories are created).
        opset: ONNX opset, at least 17 (the dynamo exporter writes at least 18).
        dynamic_batch: export the batch dimension as symbolic ``"batch"``.
        check: run the ONNX checker and compare ONNX Runtime with PyTorch on every available
            provider (CPU always; CUDA, and TensorRT with ``trt_sparsity_enable``, when
            installed) on ``example_input`` and, with ``dynamic_batch``, a second batch size.
        permutations: ``{layer: input-channel permutation applied to it}`` to record; layers
            with a ``permutation`` attribute are recorded from it.
        exporter: ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (TorchScript, then dynamo
            if TorchScript fails).
        tolerance: largest allowed max-abs difference on the CPU provider.

    Returns:
        An :class:`ExportResult`. Raises :class:`ParityError` if the CPU difference exceeds
        ``tolerance`` (the file is kept for inspection).
    """
    if opset < 17:
        raise ValueError(f"opset must be at least 17, got {opset}")
    if exporter not in ("auto", "torchscript", "dynamo"):
        raise ValueError(f"exporter must be 'auto', 'torchscript' or 'dynamo', got {exporter!r}")
    if not isinstance(example_input, torch.Tensor) or example_input.dim() != 4:
        shape = tuple(example_input.shape) if isinstance(example_input, torch.Tensor) else type(example_input)
        raise ValueError(f"example_input must be a [B, C, H, W] tensor, got {shape}")
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    if bad or example_input.dtype != torch.float32:
        raise TypeError(
            f"export an fp32 model and input (found {bad[0] if bad else 'input'} in a lower precision); "
            "TensorRT builds fp16 engines from an fp32 ONNX file itself"
        )
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    export_model = dense_copy(model).eval()
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    notes: list[str] = []
    for i, name in enumerate(order):
        try:
            used, written_opset = _torch_export(export_model, example_input, path, opset, dynamic_batch, name)
            break
        except Exception as exc:  # any exporter failure: try the next one, then report them all
            notes.append(f"{name} exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if i == len(order) - 1:
                raise RuntimeError("ONNX export failed: " + "; ".join(notes)) from exc
    layers = _record_layers(model, export_model, path, dict(permutations or {}))
    result = ExportResult(str(path), used, written_opset, layers, notes=notes)
    if check:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
        result.checker_passed = True
        batches = (
            [example_input.shape[0], example_input.shape[0] + 2]
            if dynamic_batch
            else [example_input.shape[0]]
        )
        _parity(model, path, example_input, batches, result)
        cpu = result.max_abs_diff["CPUExecutionProvider"]
        if not cpu <= tolerance:
            raise ParityError(
                f"{path}: ONNX Runtime CPU differs from PyTorch by {cpu:.3g} > {tolerance:g} (max abs)"
            )
    return result


def _record_layers(
    model: nn.Module, exported: nn.Module, path: Path, permutations: dict[str, Sequence[int]]
) -> list[LayerRecord]:
    """Find each weight layer's initializer and write the knsparse metadata into ``path``.

    ``exported`` is ``model``'s dense export copy (same layer names).
    """
    import onnx

    proto = onnx.load(str(path))
    inits = _load_initializers(proto)
    layers = _weight_layers(model)
    dense_layers = dict(exported.named_modules())
    unknown = sorted(set(permutations) - set(layers))
    if unknown:
        raise ValueError(f"permutations name layers the model does not have: {unknown[:5]}")
    used: set[str] = set()
    records = []
    for name, module in layers.items():
        weight = dense_layers[name].weight.detach().float().cpu()
        init, transposed = _match_initializer(weight.numpy(), inits, used)
        if init is not None:
            used.add(init)
        perm = permutations.get(name, getattr(module, "permutation", None))
        perm_list = None if perm is None else [int(i) for i in torch.as_tensor(perm).tolist()]
        records.append(LayerRecord(name, init, transposed, _layer_pattern(weight, module), perm_list))
    meta = {"version": package_version(), "layers": [asdict(r) for r in records]}
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    if proto.ByteSize() >= _TWO_GB:
        onnx.save(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save(proto, str(path))
    return records


def read_metadata(path: str | Path) -> dict:
    """The ``"knsparse"`` metadata of an exported file (``{}`` if it has none)."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    for entry in proto.metadata_props:
        if entry.key == METADATA_KEY:
            return json.loads(entry.value)
    return {}


# ------------------------------------------------------------------------------ check


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

    Raises ``FileNotFoundError`` if ``path`` does not exist and ``ValueError`` if it is not a
    readable ONNX model.
    """
    import onnx

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no ONNX file at {path}")
    try:
        proto = onnx.load(str(path))
    except Exception as exc:  # onnx raises DecodeError and others on a corrupt file
        raise ValueError(f"{path} is not a readable ONNX model: {exc}") from exc
    owners = {
        r["initializer"]: r["layer"] for r in read_metadata(path).get("layers", []) if r.get("initializer")
    }
    uses = _consumers(proto.graph)
    out = []
    for name, arr in _load_initializers(proto).items():
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
