"""Throughput audit: the same weights run dense and sparse, batch by batch.

``audit`` builds two copies of a model from the same weights — a dense one (plain layers
holding the exact zeros) and a sparse one (``swap_modules`` with the requested backends) —
checks that their weights are identical, then times both, interleaved, at every batch size:
warm-up, CUDA graphs where capture works, ``repeats`` measurements of ``inner`` calls each,
medians with 10%/90% quantiles. The speed-up spread comes from the per-repeat ratios of the
interleaved pairs, so machine noise common to both sides cancels.

On a machine without CUDA the sparse copy runs the reference backend (masked dense math) in
float32 — PyTorch's CPU fp16 GEMMs are slow or missing — so the audit measures the code
path, not sparse tensor cores, and says so in every output.
"""

from __future__ import annotations

import copy
import json
import math
import statistics
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..backends import names as backend_names
from ..core.checks import (
    check_choice,
    check_device,
    check_flag,
    check_image_shape,
    check_ints,
    check_module,
    check_number,
)
from ..core.layers import masks_from_zeros
from ..core.masks import apply_masks
from ..core.pattern import Pattern
from ..core.plan import SparsityPlan, as_plan
from ..sparse.densify import dense_copy
from ..sparse.fuse import fuse_activations as fuse_mlp_activations
from ..sparse.modules import sparse_layers, swap_modules
from ..utils.batches import Batch
from ..utils.provenance import environment
from ..utils.renamed import renamed
from ..utils.timing import seconds_per_call
from . import tome

CPU_NOTE = (
    "CPU run: the sparse model executed the reference backend (masked dense math) in float32; "
    "no sparse tensor cores were measured."
)


@dataclass(frozen=True)
class Spread:
    """Median and the 10% / 90% quantiles of repeated measurements."""

    median: float
    q10: float
    q90: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        if len(values) == 1:
            return cls(values[0], values[0], values[0])
        deciles = statistics.quantiles(values, n=10, method="inclusive")
        return cls(statistics.median(values), deciles[0], deciles[-1])


@dataclass(frozen=True)
class AuditRow:
    """One batch size: images per second of both copies and the speed-up."""

    checkpoint: str
    endpoint: str
    batch: int
    dense_ips: Spread | None
    sparse_ips: Spread | None
    speedup: Spread | None
    status: str


@dataclass(frozen=True)
class LayerStatus:
    """Whether a weight layer ran sparse in the audit, and on which backend (or why not)."""

    name: str
    shape: tuple[int, ...]
    backend: str | None  # None: the layer ran dense in the sparse copy too
    reason: str


@dataclass
class AuditResult:
    checkpoint: str
    device: str
    dtype: str
    pattern: str
    merges_per_block: list[int]
    rows: list[AuditRow]
    layers: list[LayerStatus]
    max_abs_diff: float  # sparse vs dense output at the first batch size
    environment: dict
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def to_markdown(self) -> str:
        """Notes, the per-batch table and the per-layer table."""

        def ips(s: Spread | None) -> str:
            return "—" if s is None else f"{s.median:,.0f} ({s.q10:,.0f}–{s.q90:,.0f})"

        def ratio(s: Spread | None) -> str:
            return "—" if s is None else f"{s.median:.2f}x ({s.q10:.2f}–{s.q90:.2f})"

        env = self.environment
        lines = [
            f"Device: {self.device}; dtype {self.dtype}; pattern {self.pattern}; "
            f"torch {env['versions'].get('torch')}; commit {env['commit']}",
            *[f"> {note}" for note in self.notes],
            "",
            "Images/s are medians over repeats with the 10%–90% range; the speed-up range comes from "
            "interleaved dense/sparse pairs. Weights are identical in both copies (checked); "
            f"max |sparse − dense| output difference: {self.max_abs_diff:.3g}.",
            "",
            "| checkpoint | endpoint | batch | dense im/s | sparse im/s | speedup | status |",
            "| --- | --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for r in self.rows:
            lines.append(
                f"| {r.checkpoint} | {r.endpoint} | {r.batch} | {ips(r.dense_ips)} | {ips(r.sparse_ips)} "
                f"| {ratio(r.speedup)} | {r.status} |"
            )
        lines += ["", "| layer | weight shape | ran as | why |", "| --- | --- | --- | --- |"]
        for layer in self.layers:
            ran = f"sparse ({layer.backend})" if layer.backend else "dense"
            lines.append(f"| {layer.name} | {list(layer.shape)} | {ran} | {layer.reason} |")
        return "\n".join(lines)

    def plot(self, path: str | Path) -> Path:
        """PNG of the median speed-up (10%–90% bars) against batch size."""
        return plot_speedup([self], path)

    def save(self, directory: str | Path, stem: str = "audit") -> dict[str, Path]:
        """Write ``<stem>.md``, ``<stem>.json`` and ``<stem>.png`` into ``directory``."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        paths = {"markdown": directory / f"{stem}.md", "json": directory / f"{stem}.json"}
        paths["markdown"].write_text(f"# Throughput audit: {self.checkpoint}\n\n{self.to_markdown()}\n")
        paths["json"].write_text(json.dumps(self.to_dict(), indent=2) + "\n")
        paths["png"] = self.plot(directory / f"{stem}.png")
        return paths


def plot_speedup(results: Sequence[AuditResult], path: str | Path) -> Path:
    """One PNG: median sparse/dense throughput ratio (10%–90% bars) against batch size,
    a line per audit."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for result in results:
        rows = [r for r in result.rows if r.speedup is not None]
        if not rows:
            continue
        med = [r.speedup.median for r in rows]
        err = [
            [r.speedup.median - r.speedup.q10 for r in rows],
            [r.speedup.q90 - r.speedup.median for r in rows],
        ]
        label = f"{result.checkpoint} ({result.pattern}, {result.dtype})"
        ax.errorbar([r.batch for r in rows], med, yerr=err, marker="o", capsize=3, label=label)
    ax.set_xscale("log", base=2)
    ax.axhline(1.0, color="grey", linestyle="--", linewidth=1)
    ax.set_xlabel("batch size")
    ax.set_ylabel("sparse / dense throughput")
    devices = sorted({r.device for r in results})
    title = ", ".join(devices)
    if any(d.startswith("CPU") for d in devices):
        title += "\n(CPU: reference path, no sparse tensor cores measured)"
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


# ---------------------------------------------------------------------------- building


def _plan_of(
    model: nn.Module, plan: SparsityPlan | Mapping[str, torch.Tensor] | None, pattern: str | Pattern | None
) -> SparsityPlan:
    """The plan to swap with, read whole: given, from the model's sparse layers, or from k:n
    zeros in its weights (:func:`knsparse.core.layers.masks_from_zeros`)."""
    swapped = sparse_layers(model)
    if plan is not None:
        return as_plan(plan, pattern)
    if swapped:
        patterns = {layer.pattern for layer in swapped.values()}
        if len(patterns) > 1:
            raise ValueError(
                f"the model mixes sparse patterns {sorted(map(str, patterns))}; audit one pattern at a time"
            )
        return SparsityPlan(patterns.pop(), {n: layer.mask() for n, layer in swapped.items()})
    found = Pattern.parse("2:4" if pattern is None else pattern)
    inferred = masks_from_zeros(model, found)
    if not inferred:
        raise ValueError(
            f"nothing to audit: the model has no sparse layers, no masks were given and no layer's "
            f"weights are {found} sparse"
        )
    return SparsityPlan(found, inferred)


def _check_identical(dense: nn.Module, sparse: nn.Module) -> None:
    """Raise if any weight differs between the two copies."""
    dense_layers = dict(dense.named_modules())
    for name, layer in sparse_layers(sparse).items():
        if not torch.equal(layer.dense_weight(), dense_layers[name].weight):
            raise RuntimeError(f"layer {name!r}: sparse and dense copies hold different weights")
    sparse_state = sparse.state_dict()
    for key, value in dense.state_dict().items():
        if key in sparse_state and not torch.equal(sparse_state[key], value):
            raise RuntimeError(f"{key}: sparse and dense copies differ")


def _layer_statuses(dense: nn.Module, masks: Mapping[str, torch.Tensor], report) -> list[LayerStatus]:
    out = []
    for name, module in dense.named_modules():
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            continue
        shape = tuple(module.weight.shape)
        if name in report.swapped:
            out.append(LayerStatus(name, shape, report.swapped[name], ""))
        elif name in report.skipped:
            out.append(LayerStatus(name, shape, None, report.skipped[name]))
        else:
            out.append(LayerStatus(name, shape, None, "no mask"))
    return out


# ----------------------------------------------------------------------------- timing


def _runner(
    model: nn.Module, x: torch.Tensor, use_graph: bool, warmup: int
) -> tuple[Callable[[], object], str]:
    """A no-argument callable running ``model(x)``, CUDA-graphed when capture works."""

    def eager() -> torch.Tensor:
        return model(x)

    if not use_graph:
        for _ in range(warmup):
            eager()
        return eager, "eager"
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(warmup, 3)):
            eager()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            eager()
    except RuntimeError as err:  # capture-unsafe op in a backend: measure eagerly instead
        torch.cuda.synchronize()
        return eager, f"eager (CUDA graph capture failed: {str(err).splitlines()[0][:120]})"
    graph.replay()
    return graph.replay, "cuda-graph"


def _measure_batch(
    dense: nn.Module,
    sparse: nn.Module,
    x: torch.Tensor,
    use_graph: bool,
    warmup: int,
    repeats: int,
    min_time_s: float,
) -> tuple[Spread, Spread, Spread, str]:
    def timer(fn: Callable[[], object], inner: int) -> float:
        return seconds_per_call(fn, x.device, inner)

    run_dense, how_dense = _runner(dense, x, use_graph, warmup)
    run_sparse, how_sparse = _runner(sparse, x, use_graph, warmup)
    inner = max(1, min(1000, math.ceil(min_time_s / max(timer(run_dense, 1), 1e-9))))
    dense_t, sparse_t = [], []
    for i in range(repeats):
        # Alternate which copy goes first so drift over time hits both equally.
        if i % 2 == 0:
            dense_t.append(timer(run_dense, inner))
            sparse_t.append(timer(run_sparse, inner))
        else:
            sparse_t.append(timer(run_sparse, inner))
            dense_t.append(timer(run_dense, inner))
    b = x.shape[0]
    endpoint = how_dense if how_dense == how_sparse else f"dense {how_dense}, sparse {how_sparse}"
    return (
        Spread.of([b / t for t in dense_t]),
        Spread.of([b / t for t in sparse_t]),
        Spread.of([d / s for d, s in zip(dense_t, sparse_t, strict=True)]),
        endpoint,
    )


def _status(speedup: Spread, device: torch.device) -> str:
    if device.type != "cuda":
        return "reference path (no sparse tensor cores)"
    if speedup.q10 > 1.0:
        return "faster"
    if speedup.q90 < 1.0:
        return "slower"
    return "no clear difference"


@renamed(masks="plan", backends="backend")
def audit(
    model: nn.Module,
    input_shape: Sequence[int],
    batch_sizes: Sequence[int] = (1, 8, 32, 64, 128),
    dtype: torch.dtype = torch.float16,
    backend: str = "auto",
    tome_r: int | Sequence[int] = 0,
    plan: SparsityPlan | Mapping[str, torch.Tensor] | None = None,
    pattern: str | Pattern | None = None,
    checkpoint: str | None = None,
    device: torch.device | str | None = None,
    cuda_graphs: bool = True,
    warmup: int | None = None,
    repeats: int | None = None,
    min_time_s: float | None = None,
    progress: bool = True,
    fuse_activations: bool = False,
) -> AuditResult:
    """Dense vs sparse throughput of the same weights at every batch size.

    Args:
        model: a swapped model (SparseLinear/SparseConv2d inside), a dense model with a
            ``plan``, or a model whose weights already hold k:n zeros. Left untouched.
        input_shape: ``(C, H, W)``, or ``(B, C, H, W)`` whose ``B`` is ignored.
        batch_sizes: batch sizes to time.
        dtype: compute dtype on CUDA (sparse tensor cores need fp16/bf16); CPU runs float32.
        backend: ``"auto"`` or a backend name for the sparse copy (see ``knsparse.backends``).
        tome_r: token merges per block, applied to both copies.
        plan: a :class:`~knsparse.core.plan.SparsityPlan` (``prune(...).plan``, read whole: its
            pattern and conv order) or ``{layer: bool mask}`` for a dense model; ``pattern``
            (for a dict) defaults to ``"2:4"``.
        checkpoint: the name shown in the table (default: the model's class name).
        device: default CUDA when available, else CPU.
        cuda_graphs: replay CUDA graphs on GPU where capture works (else eager).
        warmup, repeats, min_time_s: untimed calls, timed measurements per batch, and the
            least time one measurement spans (defaults: 10/20/0.05 on CUDA, 1/5/0.05 on CPU).
        progress: show a progress bar over the batch sizes.
        fuse_activations: move each MLP's GELU/ReLU into its sparse ``fc1``
            (:func:`knsparse.sparse.fuse.fuse_activations`) in the sparse copy only; the dense copy
            keeps PyTorch's separate activation kernel, and a note says so.

    Returns:
        An :class:`AuditResult` (``.to_markdown()``, ``.save(dir)`` for markdown, JSON, PNG).
    """
    check_module(model, meta="refuse")
    device = check_device(device) if device is not None else None
    device = device or torch.device("cuda" if torch.cuda.is_available() else "cpu")
    on_cuda = device.type == "cuda"
    shape = check_image_shape(input_shape)[1:]
    if not check_ints(batch_sizes, "batch_sizes", low=1):
        raise ValueError("batch_sizes is empty")
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
    check_choice(backend, "backend", ("auto", *backend_names()))
    tome.merge_schedule(model, tome_r, "tome_r")
    if checkpoint is not None and not isinstance(checkpoint, str):
        raise TypeError(f"checkpoint must be a str (the name shown), got {type(checkpoint).__name__}")
    check_flag(cuda_graphs, "cuda_graphs")
    check_flag(fuse_activations, "fuse_activations")
    for arg, value, low in (("warmup", warmup, 0), ("repeats", repeats, 1)):
        if value is not None:
            check_number(value, arg, low=low, integer=True)
    if min_time_s is not None:
        check_number(min_time_s, "min_time_s", low=0)
    notes = []
    run_dtype = dtype if on_cuda else torch.float32
    if not on_cuda:
        notes.append(CPU_NOTE)
        if dtype != torch.float32:
            notes.append(f"requested {dtype} was replaced by torch.float32 on CPU.")
    warmup = warmup if warmup is not None else (10 if on_cuda else 1)
    repeats = repeats if repeats is not None else (20 if on_cuda else 5)
    min_time_s = min_time_s if min_time_s is not None else 0.05

    plan = _plan_of(model, plan, pattern)
    dense = dense_copy(model).eval()
    apply_masks(dense, plan.masks)
    dense = dense.to(device, run_dtype)
    sparse = copy.deepcopy(dense)
    report = swap_modules(sparse, plan, backend=backend)
    _check_identical(dense, sparse)
    if not report.swapped:
        notes.append("no layer was swapped: both copies run dense (see the layer table for why).")
    if fuse_activations:
        fused = fuse_mlp_activations(sparse)
        notes.append(
            f"activations fused into the sparse fc1 of {len(fused)} MLP block(s) (the dense copy runs "
            "them as separate kernels); knsparse-cuda fuses them into its GEMM epilogue, other "
            "backends apply them after the GEMM."
        )
    if tome_r:
        tome.apply(dense, tome_r)
        tome.apply(sparse, tome_r)
    name = checkpoint or type(model).__name__
    env = environment(device)
    rows: list[AuditRow] = []
    generator = torch.Generator().manual_seed(0)
    max_diff = float("nan")
    with torch.no_grad():
        for i, b in enumerate(
            tqdm(list(batch_sizes), desc=f"audit {name}", disable=not progress, leave=False)
        ):
            x = torch.randn((int(b), *shape), generator=generator).to(device, run_dtype)
            if i == 0:  # an input_shape the model cannot take fails here, naming it and the layer
                reference = Batch((x,), label=f"input_shape {tuple(input_shape)}")(dense, locate=True)
                max_diff = float((sparse(x).float() - reference.float()).abs().max())
            try:
                d, s, r, how = _measure_batch(
                    dense, sparse, x, on_cuda and cuda_graphs, warmup, repeats, min_time_s
                )
            except torch.OutOfMemoryError:
                torch.cuda.empty_cache()
                rows.append(AuditRow(name, "—", int(b), None, None, None, "out of memory"))
                continue
            endpoint = f"torch {how}, {str(run_dtype).removeprefix('torch.')}"
            rows.append(AuditRow(name, endpoint, int(b), d, s, r, _status(r, device)))
    return AuditResult(
        checkpoint=name,
        device=env["device"],
        dtype=str(run_dtype).removeprefix("torch."),
        pattern=str(plan.pattern),
        merges_per_block=tome.merges_per_block(dense),
        rows=rows,
        layers=_layer_statuses(dense, plan.masks, report),
        max_abs_diff=max_diff,
        environment=env,
        notes=notes,
    )
