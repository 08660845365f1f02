"""ONNX export of (sparse) models for TensorRT 11 and ONNX Runtime.

ONNX has no N:M layout: a k:n layer travels as a dense initializer holding the exact zeros,
consumed directly by a standard ``MatMul``/``Gemm``/``Conv`` (the exporter removes the
``Identity`` nodes torch sometimes puts between an initializer and its reader, which would hide
it from TensorRT's sparsity detection). TensorRT 11 networks are strongly typed: a float16 or
bfloat16 engine needs an ONNX file that carries float16/bfloat16 weights and compute itself,
which ``dtype=`` writes. Eligibility of the written weights is checked by
:func:`knsparse.deploy.onnx_check.check` (re-exported here as ``check``).

``export_onnx`` records which initializer each PyTorch layer became, its pattern and its
applied channel permutation in the model's ``metadata_props`` (key ``"knsparse"``).
"""

from __future__ import annotations

import copy
import shutil
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..core.checks import (
    FLOAT_DTYPES,
    check_choice,
    check_flag,
    check_module,
    check_number,
    check_path,
    check_tensor,
)
from ..core.masks import apply_masks
from ..core.plan import SparsityPlan, as_plan
from ..sparse.densify import dense_copy
from ..sparse.modules import SparseConv2d, SparseLinear
from ..sparse.quantized import QUANT_LAYERS, float_copy, quant_layers
from ..utils.batches import Batch, output_tensors
from ..utils.provenance import package_version
from .onnx_check import (
    METADATA_KEY,
    InitializerCheck,
    check,
    check_markdown,
    initializer_arrays,
    read_metadata,
)
from .qdq import MIN_OPSET, QDQ_WEIGHTS, insert_qdq

__all__ = [
    "METADATA_KEY",
    "ExportResult",
    "InitializerCheck",
    "LayerRecord",
    "ParityError",
    "check",
    "check_markdown",
    "export_onnx",
    "read_metadata",
]

_TWO_GB = 2**31
EXPORTERS = ("auto", "torchscript", "dynamo")
"""``"auto"`` tries TorchScript, then dynamo; the one list of the exporters."""


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
    dtype: str = "float32"
    input_names: list[str] = field(default_factory=list)
    output_names: list[str] = field(default_factory=list)
    checker_passed: bool | None = None
    # provider -> max |ORT - fp32 PyTorch| over the checked batch sizes and outputs
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    # max |PyTorch in `dtype` - fp32 PyTorch|: the low-precision error the ONNX file may double
    torch_dtype_error: float = 0.0
    tolerance: float = 0.0  # the bound applied to the CPU provider's difference
    batch_sizes_checked: list[int] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    # a quantized file: ORT's activation codes against PyTorch's, and the replay with ORT's codes
    # (knsparse.deploy.qdq_parity.CodeParity.to_dict()); None otherwise
    quant_parity: dict | None = None

    def to_dict(self) -> dict:
        return asdict(self)


# ----------------------------------------------------------------------------- inputs


def example_call(example_input: object) -> tuple[Batch, list[str]]:
    """The model call and ONNX input names for ``example_input``: a tensor (``"input"``), a
    tuple/list of tensors (positional, ``"input_0"``...) or a mapping of tensors (keyword
    arguments, named by their keys, e.g. ``pixel_values``). ``TypeError`` otherwise."""
    if isinstance(example_input, torch.Tensor):
        check_tensor(example_input, "example_input", floating=False)
        return Batch((example_input,), label="example_input"), ["input"]

    def tensors(items: object) -> bool:
        return bool(items) and all(isinstance(t, torch.Tensor) for t in items)

    if isinstance(example_input, (tuple, list)) and tensors(example_input):
        for i, t in enumerate(example_input):
            check_tensor(t, f"example_input[{i}]", floating=False)
        return Batch(tuple(example_input), label="example_input"), [
            f"input_{i}" for i in range(len(example_input))
        ]
    if isinstance(example_input, Mapping) and tensors(list(example_input.values())):
        for k, t in example_input.items():
            check_tensor(t, f"example_input[{k!r}]", floating=False)
        return Batch(kwargs=dict(example_input), label="example_input"), [str(k) for k in example_input]
    raise TypeError(
        "example_input must be a tensor, a non-empty tuple of tensors or a mapping of tensors "
        f"(keyword inputs), got {type(example_input).__name__}"
    )


class _Flat(nn.Module):
    """Positional tensors in, a tuple of tensors out: what both ONNX exporters take."""

    def __init__(self, model: nn.Module, keywords: Sequence[str] | None) -> None:
        super().__init__()
        self.model, self.keywords = model, list(keywords or [])

    def forward(self, *inputs: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = (
            self.model(**dict(zip(self.keywords, inputs, strict=True)))
            if self.keywords
            else self.model(*inputs)
        )
        return tuple(output_tensors(out))


def _flat_inputs(call: Batch) -> tuple[torch.Tensor, ...]:
    return call.args if call.args else tuple(call.kwargs.values())


def _cast(inputs: Sequence[torch.Tensor], dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    """Floating inputs in ``dtype``; integer inputs (token ids, masks) unchanged."""
    return tuple(t.to(dtype) if t.is_floating_point() else t for t in inputs)


def _other_batch(inputs: Sequence[torch.Tensor], size: int, seed: int = 0) -> tuple[torch.Tensor, ...]:
    """Inputs with batch ``size``: rows of the example (cycled), floating ones plus noise."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for t in inputs:
        rows = t[torch.arange(size, device=t.device) % t.shape[0]]
        if t.is_floating_point():
            noise = torch.randn(rows.shape, generator=g).to(rows)
            rows = rows + 0.1 * noise * rows.float().std().clamp_min(1e-3).to(rows.dtype)
        out.append(rows)
    return tuple(out)


# ----------------------------------------------------------------------------- export


def _weight_layers(model: nn.Module) -> dict[str, nn.Module]:
    kinds = (nn.Linear, nn.Conv2d, SparseLinear, SparseConv2d, *QUANT_LAYERS)
    return {n: m for n, m in model.named_modules() if isinstance(m, kinds) and n}


def _layer_pattern(name: str, module: nn.Module, plan: SparsityPlan | None) -> str:
    """The layer's pattern as the plan or its sparse module declares it (never guessed from
    its zeros): ``"2:4"``, ``"8:16/crs"``, ... or ``"dense"``."""
    if plan is not None and name in plan.masks:
        return str(plan.pattern)
    declared = getattr(module, "pattern", None)
    return "dense" if declared is None else str(declared)


def _input_permutations(plan: SparsityPlan | None) -> dict[str, list[int]]:
    """``{layer: the permutation of its input channels}`` for every consumer of a permuted
    coupling group in ``plan``."""
    if plan is None:
        return {}
    return {
        name: list(p.order) for p in plan.permutation for name, role, _, _ in p.members if role == "consumer"
    }


def _match_initializer(
    weight: np.ndarray, inits: Mapping[str, np.ndarray], used: set[str]
) -> tuple[str | None, bool]:
    """The initializer holding ``weight`` as-is or transposed, up to a per-output-channel scale.

    The scale allows exporters that fold BatchNorm into the preceding Conv. ``weight`` is in the
    exported dtype, so the comparison is at that dtype's resolution.
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
            tol = 1e-5 if arr.dtype == np.float32 else 1e-2
            live = scale != 0  # a channel folded with a zero BatchNorm scale is all zeros
            same_zeros = ((c == 0) == (rows == 0))[live].all()
            if np.allclose(c, rows * scale[:, None], rtol=tol, atol=1e-7) and same_zeros:
                return name, transposed
    return None, False


def _torch_export(
    model: nn.Module,
    inputs: tuple[torch.Tensor, ...],
    path: Path,
    names: tuple[list[str], list[str]],
    opset: int,
    dynamic_batch: bool,
    exporter: str,
) -> int:
    """Run one of torch's exporters; returns the opset written."""
    input_names, output_names = names
    if exporter == "torchscript":
        axes = {n: {0: "batch"} for n in (*input_names, *output_names)} if dynamic_batch else None
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the TorchScript exporter announces its deprecation
            torch.onnx.export(
                model,
                inputs,
                str(path),
                opset_version=opset,
                dynamo=False,
                dynamic_axes=axes,
                input_names=input_names,
                output_names=output_names,
            )
        return opset
    # torch's dynamo exporter implements opset >= 18 and converts down only on request.
    opset = max(opset, 18)
    batch = torch.export.Dim("batch", min=1)
    shapes = tuple({0: batch} for _ in inputs) if dynamic_batch else None
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(
            model,
            inputs,
            str(path),
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=(shapes,) if shapes else None,
            verbose=False,
            external_data=False,
            input_names=input_names,
            output_names=output_names,
        )
    return opset


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


def _numpy(t: torch.Tensor) -> np.ndarray:
    """A tensor as numpy; bfloat16 (no numpy dtype) as ml_dtypes' bfloat16, which onnx ships."""
    if t.dtype == torch.bfloat16:
        import ml_dtypes

        return t.detach().float().cpu().numpy().astype(ml_dtypes.bfloat16)
    return t.detach().cpu().numpy()


def _max_diff(got: Sequence[torch.Tensor | np.ndarray], want: Sequence[torch.Tensor]) -> float:
    def as_float(g: torch.Tensor | np.ndarray) -> torch.Tensor:
        if isinstance(g, torch.Tensor):
            return g.detach().float().cpu()
        return torch.from_numpy(np.asarray(g, dtype=np.float32))

    diffs = [float((as_float(g) - w.float().cpu()).abs().max()) for g, w in zip(got, want, strict=True)]
    return max(diffs, default=0.0)


def _parity(
    model: nn.Module,
    exported: nn.Module,
    path: Path,
    call: Batch,
    dtype: torch.dtype,
    batch_sizes: Sequence[int],
    result: ExportResult,
    twin_dtype: torch.dtype | None = None,
    quant_dtype: str | None = None,
) -> None:
    """Compare ONNX Runtime and PyTorch in ``dtype`` with the fp32 model on the same inputs.

    ``exported`` is PyTorch's computation in ``dtype`` (``twin_dtype`` when given: a quantized
    model's float64 twin, whose distance to the float32 fake-quantized ``model`` is PyTorch's own
    rounding error). ``quant_dtype="fp8"`` runs ONNX Runtime at graph optimization level BASIC:
    its EXTENDED Q/DQ fusions change float8 results (measured on the CPU provider, 1.32)."""
    import onnxruntime as ort

    first = _flat_inputs(call)
    runs = [first] + [_other_batch(first, b) for b in batch_sizes[1:]]
    flat_fp32 = _Flat(model, None if call.args else list(call.kwargs))
    with torch.no_grad():
        expected = [flat_fp32(*xs) for xs in runs]
        low = [exported(*_cast(xs, twin_dtype or dtype)) for xs in runs]
    result.torch_dtype_error = max(_max_diff(lo, ex) for lo, ex in zip(low, expected, strict=True))
    result.batch_sizes_checked = [int(xs[0].shape[0]) for xs in runs]
    for label, providers in _run_providers(path):
        try:
            options = ort.SessionOptions()
            if quant_dtype == "fp8":
                options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
                if not any("BASIC" in n for n in result.notes):
                    result.notes.append("float8 Q/DQ: ONNX Runtime run at graph optimization level BASIC")
            session = ort.InferenceSession(str(path), options, providers=providers)
        except Exception as exc:  # e.g. no bfloat16 kernels on the CPU provider
            result.notes.append(
                f"{label} cannot run the {result.dtype} file: {str(exc).splitlines()[0][:200]}"
            )
            continue
        diff = 0.0
        for xs, want in zip(runs, expected, strict=True):
            feed = {n: _numpy(t) for n, t in zip(result.input_names, _cast(xs, dtype), strict=True)}
            diff = max(diff, _max_diff(session.run(None, feed), want))
        result.max_abs_diff[label] = diff


def export_onnx(
    model: nn.Module,
    example_input: object,
    path: str | Path,
    opset: int = 17,
    dynamic_batch: bool = True,
    check: bool = True,
    permutations: Mapping[str, Sequence[int]] | None = None,
    exporter: str = "auto",
    tolerance: float = 1e-4,
    dtype: str | torch.dtype = "float32",
    plan: SparsityPlan | Mapping[str, torch.Tensor] | None = None,
    qdq_weights: str = "int8",
) -> ExportResult:
    """Export ``model`` (dense, masked or swapped to sparse modules) to ONNX.

    Args:
        model: an fp32 ``nn.Module`` (left untouched; a deep copy in eval mode is exported,
            with SparseLinear/SparseConv2d turned into Linear/Conv2d holding the exact zeros).
        example_input: fp32 input(s) on the model's device: a tensor of any rank (ONNX input
            ``"input"``), a tuple of tensors (positional, ``"input_0"``...), or a mapping of
            tensors passed as keyword arguments (e.g. ``{"pixel_values": x}`` for a Hugging Face
            model; the inputs are named by the keys). Axis 0 of every input is the batch.
            Outputs: every tensor of the model's output (a tensor, tuple or ``ModelOutput``),
            named ``"output"`` or ``"output_0"``...
        path: the ``.onnx`` file to write (parent directories are created).
        opset: ONNX opset, at least 17 (the dynamo exporter writes at least 18).
        dynamic_batch: export axis 0 of every input and output as symbolic ``"batch"``.
        check: run the ONNX checker and compare ONNX Runtime with the fp32 PyTorch model on
            every available provider (CPU always; CUDA, and TensorRT with
            ``trt_sparsity_enable``, when installed) on ``example_input`` and, with
            ``dynamic_batch``, a second batch size. A provider that cannot load the file (ONNX
            Runtime's CPU provider has no bfloat16 kernels) is said in ``notes``.
        permutations: ``{layer: input-channel permutation applied to it}`` to record, beside the
            plan's (layers with a ``permutation`` attribute are recorded from it).
        exporter: ``"torchscript"``, ``"dynamo"`` or ``"auto"`` (TorchScript, then dynamo
            if TorchScript fails).
        tolerance: largest allowed max-abs difference on the CPU provider for float32; for
            float16/bfloat16 the bound is ``max(tolerance, 2 x torch_dtype_error)``, twice the
            error of PyTorch's own computation in that dtype against fp32.
        dtype: ``"float32"``, ``"float16"`` or ``"bfloat16"`` (or the torch dtype): the weights
            and computation of the written file (TensorRT 11 builds engines in the file's types).
            bfloat16 is written by the dynamo exporter at opset >= 22 (ONNX's first bfloat16 Conv).
        plan: a :class:`~knsparse.core.plan.SparsityPlan` (``prune(...).plan``) or ``{layer: mask}``
            (2:4) to apply to the exported copy: a dense model and its plan give the k:n file
            directly (the user's model keeps its weights). Its pattern, conv order, channel
            permutation and recipe go into the file's metadata (:func:`read_metadata`); without
            a plan, a layer's pattern is the one its sparse module declares.

    Returns:
        An :class:`ExportResult`. Raises :class:`ParityError` if the CPU difference exceeds the
        bound (the file is kept for inspection).
    """
    check_module(model, meta="refuse")
    check_path(path, "path")
    check_number(opset, "opset", low=17, integer=True)
    check_flag(dynamic_batch, "dynamic_batch")
    check_flag(check, "check")
    check_choice(exporter, "exporter", EXPORTERS)
    check_number(tolerance, "tolerance", low=0, low_open=True)
    check_choice(qdq_weights, "qdq_weights", QDQ_WEIGHTS)
    _check_permutations(permutations)
    quant_dtypes = {layer.dtype_name for layer in quant_layers(model).values()}
    if len(quant_dtypes) > 1:
        raise ValueError(f"model mixes quantized dtypes {sorted(quant_dtypes)}: export one at a time")
    if quant_dtypes:
        if dtype not in ("float32", torch.float32):
            raise ValueError(
                f"dtype={dtype!r}: a quantized model is written with float32 compute around its Q/DQ nodes"
            )
        opset = max(opset, MIN_OPSET[next(iter(quant_dtypes))])
    if plan is not None:
        plan = as_plan(plan)
        model = dense_copy(model)
        apply_masks(model, plan.masks)  # checks every name and shape first
    permutations = {**_input_permutations(plan), **dict(permutations or {})}
    dtype_name = next((k for k, v in FLOAT_DTYPES.items() if dtype in (k, v)), None)
    if dtype_name is None:
        raise ValueError(f"dtype must be one of {sorted(FLOAT_DTYPES)}, got {dtype!r}")
    call, input_names = example_call(example_input)
    inputs = _flat_inputs(call)
    bad = [n for n, p in model.named_parameters() if p.is_floating_point() and p.dtype != torch.float32]
    low_input = [
        n
        for n, t in zip(input_names, inputs, strict=True)
        if t.is_floating_point() and t.dtype != torch.float32
    ]
    if bad or low_input:
        raise TypeError(
            f"export an fp32 model and input (found {(bad or low_input)[0]} in a lower precision); "
            "pass dtype='float16' or 'bfloat16' to write a low-precision file"
        )
    if any(t.dim() == 0 for t in inputs):
        raise ValueError("example_input: every input needs a batch axis 0 (got a 0-d tensor)")
    torch_dtype = FLOAT_DTYPES[dtype_name]
    if torch_dtype == torch.bfloat16:
        # ONNX Conv/Gemm take bfloat16 from opset 22, which only the dynamo exporter writes.
        if exporter == "torchscript":
            raise ValueError("dtype='bfloat16' needs opset >= 22: use exporter='dynamo' or 'auto'")
        exporter, opset = "dynamo", max(opset, 22)
    final = Path(path)
    final.parent.mkdir(parents=True, exist_ok=True)
    # Written in a scratch folder beside the target and moved into place at the end: a failure
    # leaves no partial file (and the file's external-data names stay those of the target).
    scratch = final.parent / f".{final.name}.partial"
    shutil.rmtree(scratch, ignore_errors=True)
    scratch.mkdir()
    try:
        result = _export(
            model,
            call,
            inputs,
            input_names,
            scratch / final.name,
            torch_dtype,
            dtype_name,
            opset,
            dynamic_batch,
            check,
            permutations,
            exporter,
            tolerance,
            plan,
            qdq_weights,
        )
    except ParityError:
        _move_into(scratch, final.parent)  # kept for inspection, as documented
        raise
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    _move_into(scratch, final.parent)
    result.path = str(final)
    return result


def _check_permutations(permutations: object) -> None:
    if permutations is None:
        return
    if not isinstance(permutations, Mapping):
        raise TypeError(f"permutations must be a {{layer name: permutation}} mapping, got {permutations!r}")
    for name, perm in permutations.items():
        values = perm.tolist() if isinstance(perm, torch.Tensor) else perm
        if isinstance(values, (str, bytes)) or not isinstance(values, Sequence):
            raise TypeError(f"permutations[{name!r}] must be a sequence of ints, got {type(perm).__name__}")
        if sorted(values) != list(range(len(values))):
            raise ValueError(f"permutations[{name!r}] is not a permutation of 0..{len(values) - 1}")


def _move_into(scratch: Path, folder: Path) -> None:
    for item in scratch.iterdir():
        item.replace(folder / item.name)
    scratch.rmdir()


def _export(
    model: nn.Module,
    call: Batch,
    inputs: list[torch.Tensor],
    input_names: list[str],
    path: Path,
    torch_dtype: torch.dtype,
    dtype_name: str,
    opset: int,
    dynamic_batch: bool,
    check: bool,
    permutations: Mapping[str, Sequence[int]],
    exporter: str,
    tolerance: float,
    plan: SparsityPlan | None,
    qdq_weights: str = "int8",
) -> ExportResult:
    qlayers = quant_layers(model)
    keywords = None if call.args else input_names
    twin = dense_copy(model)
    if qlayers:  # written as float layers, the Q/DQ nodes put around them afterwards
        twin = float_copy(twin)
    exported = _Flat(twin.eval().to(torch_dtype), keywords)
    low_inputs = _cast(inputs, torch_dtype)
    with torch.no_grad():  # an input the model cannot run is a ValueError naming example_input
        n_out = len(Batch(tuple(low_inputs), label=call.label)(exported))
    output_names = ["output"] if n_out == 1 else [f"output_{i}" for i in range(n_out)]
    order = ["torchscript", "dynamo"] if exporter == "auto" else [exporter]
    notes: list[str] = []
    for i, name in enumerate(order):
        try:
            written_opset = _torch_export(
                exported, low_inputs, path, (input_names, output_names), opset, dynamic_batch, name
            )
            used = name
            break
        except Exception as exc:  # any exporter failure: try the next one, then report them all
            notes.append(f"{name} exporter failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
            if i == len(order) - 1:
                raise RuntimeError("ONNX export failed: " + "; ".join(notes)) from exc
    layers = _finish_file(model, exported.model, path, dict(permutations), plan, qlayers, qdq_weights)
    result = ExportResult(
        str(path), used, written_opset, layers, dtype_name, input_names, output_names, notes=notes
    )
    if check:
        import onnx

        onnx.checker.check_model(str(path), full_check=True)
        result.checker_passed = True
        batch = int(inputs[0].shape[0])
        reference = dense_copy(model).eval()  # fp32, in eval mode: the user's model never runs
        quant_dtype = next(iter(qlayers.values())).dtype_name if qlayers else None
        _parity(
            reference,
            _Flat(copy.deepcopy(reference).double(), keywords) if qlayers else exported,
            path,
            call,
            torch_dtype,
            [batch, batch + 2] if dynamic_batch else [batch],
            result,
            torch.float64 if qlayers else None,
            quant_dtype,
        )
        # float16/bfloat16: twice PyTorch's own error in that dtype; a quantized model: twice the
        # distance of its float32 fake-quantized forward to the float64 one (the same codes but
        # where a float32 rounding moves a value across a rounding boundary: one step there)
        low = torch_dtype != torch.float32 or bool(qlayers)
        bound = max(tolerance, 2 * result.torch_dtype_error) if low else tolerance
        result.tolerance = bound
        cpu = result.max_abs_diff.get("CPUExecutionProvider")
        if qlayers:
            _quant_parity(proto_path=path, reference=reference, qlayers=qlayers, call=call, result=result)
            return result
        if cpu is not None and not cpu <= bound:
            raise ParityError(
                f"{path.name}: ONNX Runtime CPU differs from PyTorch (fp32) by {cpu:.3g} > {bound:.3g} "
                f"(max abs; PyTorch in {dtype_name} differs by {result.torch_dtype_error:.3g})"
            )
    return result


def _quant_parity(
    proto_path: Path,
    reference: nn.Module,
    qlayers: Mapping[str, nn.Module],
    call: Batch,
    result: ExportResult,
) -> None:
    """The quantized file's check (:mod:`knsparse.deploy.qdq_parity`): ``ParityError`` unless
    ONNX Runtime's activation codes are PyTorch's but for rare one-step flips and PyTorch fed
    ONNX Runtime's codes gives its outputs within ``result.tolerance``."""
    import onnx
    import onnxruntime as ort

    from .qdq_parity import MAX_FLIP_FRACTION, compare_codes

    first = _flat_inputs(call)
    runs = [first] + [_other_batch(first, b) for b in result.batch_sizes_checked[1:]]
    options = ort.SessionOptions()
    if next(iter(qlayers.values())).dtype_name == "fp8":
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_BASIC
    parity = compare_codes(
        onnx.load(str(proto_path)),
        reference,
        qlayers,
        runs,
        result.input_names,
        None if call.args else list(call.kwargs),
        options,
    )
    result.quant_parity = parity.to_dict()
    fraction = parity.flips / max(parity.codes, 1)
    if parity.max_step > 1 or fraction > MAX_FLIP_FRACTION or not parity.replay_diff <= result.tolerance:
        raise ParityError(
            f"{proto_path.name}: ONNX Runtime CPU and PyTorch disagree on the quantized model: "
            f"{parity.flips} of {parity.codes} activation codes differ (at most {MAX_FLIP_FRACTION:g} "
            f"allowed), by up to {parity.max_step:g} step(s) (1 allowed); with ONNX Runtime's codes "
            f"the outputs differ by {parity.replay_diff:.3g} (bound {result.tolerance:.3g})"
        )


def _read_initializers_directly(proto) -> None:
    """Drop every ``Identity`` whose input is an initializer (or another such Identity) and let
    its readers read the initializer itself; graph outputs keep theirs."""
    graph = proto.graph
    source = {i.name: i.name for i in graph.initializer}
    outputs = {o.name for o in graph.output}
    kept = []
    for node in graph.node:  # nodes are topologically sorted
        if node.op_type == "Identity" and node.input[0] in source and node.output[0] not in outputs:
            source[node.output[0]] = source[node.input[0]]
        else:
            kept.append(node)
    renamed = {k: v for k, v in source.items() if k != v}
    if not renamed:
        return
    for node in kept:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    del graph.node[:]
    graph.node.extend(kept)


def _strip_wrapper_prefix(proto, prefix: str = "model.") -> None:
    """Name initializers after the user's model (``blocks.0.fc1.weight``), not after the export
    wrapper that holds it (``model.blocks.0.fc1.weight``)."""
    graph = proto.graph
    taken = {i.name for i in graph.initializer}
    renamed = {n: n[len(prefix) :] for n in taken if n.startswith(prefix) and n[len(prefix) :] not in taken}
    for init in graph.initializer:
        init.name = renamed.get(init.name, init.name)
    for value in (*graph.input, *graph.value_info):
        value.name = renamed.get(value.name, value.name)
    for node in graph.node:
        for i, name in enumerate(node.input):
            node.input[i] = renamed.get(name, name)


def _finish_file(
    model: nn.Module,
    exported: nn.Module,
    path: Path,
    permutations: dict[str, Sequence[int]],
    plan: SparsityPlan | None,
    qlayers: Mapping[str, nn.Module] | None = None,
    qdq_weights: str = "int8",
) -> list[LayerRecord]:
    """Make weights read directly, find each weight layer's initializer and write the knsparse
    metadata into ``path``.

    ``exported`` is ``model``'s dense export copy (same layer names, exported dtype).
    """
    import json

    import onnx

    proto = onnx.load(str(path))
    _strip_wrapper_prefix(proto)
    _read_initializers_directly(proto)
    inits = initializer_arrays(proto)
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
        records.append(LayerRecord(name, init, transposed, _layer_pattern(name, module, plan), perm_list))
    quantization = None
    if qlayers:
        placed = insert_qdq(proto, qlayers, records, qdq_weights)
        records = [
            replace(r, initializer=placed[r.layer]["weight_initializer"]) if r.layer in placed else r
            for r in records
        ]
        quantization = {
            "dtype": next(iter(qlayers.values())).dtype_name,
            "weights": "symmetric, per output channel",
            "weight_initializers": qdq_weights,
            "activations": "symmetric, per tensor, at the input of every quantized Conv/Gemm/MatMul",
            "layers": placed,
        }
    meta = {
        "version": package_version(),
        "plan": None if plan is None else plan.metadata(),
        "layers": [asdict(r) for r in records],
        "quantization": quantization,
    }
    entry = proto.metadata_props.add()
    entry.key, entry.value = METADATA_KEY, json.dumps(meta)
    if proto.ByteSize() >= _TWO_GB:
        onnx.save(proto, str(path), save_as_external_data=True, location=f"{path.name}.data")
    else:
        onnx.save(proto, str(path))
    return records
