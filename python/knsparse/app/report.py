"""The demo report that ``knsparse demo`` writes to ``knsparse-report/``.

For the built-in ViT and ResNet trained on the bundled digits: dense vs pruned accuracy, MACs
and their reduction, ONNX export with its parity and TensorRT 2:4 check, and the
dense-vs-sparse throughput audit. Also the MACs of ViT-B/16 and ResNet-50 at 224 px (2:4, and
2:4 with token merging for ViT-B/16) and, on a CUDA machine, the throughput audit of the real
sparse backends on those two models. Output: ``index.md``, PNG plots, ``report.json``, the
ONNX files, and a markdown/JSON/PNG triple per audit under ``audit/``.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.layers import pattern_layers
from ..core.masks import from_reduction_view
from ..core.pattern import Pattern
from ..deploy.audit import AuditResult, audit, plot_speedup
from ..deploy.export import check, export_onnx
from ..deploy.macs import MacReport, macs
from ..integrations import families
from ..models import resnet50, vit_base_patch16_224
from ..pruning.config import PruneConfig
from ..pruning.methods.magnitude import magnitude_masks
from ..pruning.spectral import LayerSpectrum, diagnose
from ..sparse.modules import sparse_layers
from ..utils.provenance import environment
from .data import load_digits_split
from .pipeline import PruneOutcome, prune_and_swap
from .trainer import pretrained, torch_threads

DIGITS_MODELS = ("vit_tiny_digits", "resnet_tiny_digits")
REPAIR_EPOCHS = {"vit_tiny_digits": 4, "resnet_tiny_digits": 2}
# CAST for the ViT; CAST-conv (data-path selection on the convolutions too) for the ResNet.
DEMO_METHOD = {"vit_tiny_digits": "cast", "resnet_tiny_digits": "cast-conv"}
BATCH_SIZES = (1, 8, 32, 64, 128)
TOME_R = 16  # the ToMe paper's ViT-B/16 operating point
IMAGENET_MODELS = {"vit_base_patch16_224": vit_base_patch16_224, "resnet50": resnet50}


@dataclass
class ModelSection:
    """Everything the report shows for one digits model."""

    name: str
    prune: PruneOutcome
    macs: MacReport
    onnx: dict
    audit: AuditResult
    zeros: dict[str, float]  # Linear/Conv2d layer -> fraction of zero weights it runs with
    spectra: list[LayerSpectrum]  # MP fits of the dense model's prunable layers, with ESD plots

    def to_dict(self) -> dict:
        skip = ("masks", "swap", "prune_result")
        prune = {f.name: getattr(self.prune, f.name) for f in fields(self.prune) if f.name not in skip}
        prune.update(swapped=self.prune.swap.swapped, skipped=self.prune.swap.skipped)
        if self.prune.prune_result is not None:
            prune["layers"] = self.prune.prune_result.as_dict()
        return {
            "name": self.name,
            "prune": prune,
            "macs": self.macs.to_dict(),
            "onnx": self.onnx,
            "audit": self.audit.to_dict(),
            "zeros": self.zeros,
            "mp_fits": [row.as_dict() for row in self.spectra],
        }


@dataclass
class Report:
    directory: Path
    seconds: float
    sections: list[ModelSection]
    imagenet_macs: dict[str, MacReport]
    gpu_audits: list[AuditResult] = field(default_factory=list)

    @property
    def index(self) -> Path:
        return self.directory / "index.md"


def _tiled_mask(shape: torch.Size, pattern: Pattern) -> torch.Tensor:
    """A k:n mask keeping the first ``k`` of every group along the (R, S, C) reduction axis.

    MAC counts depend only on which layers are k:n, not on which weights are kept, so the
    shape-only (meta) ImageNet models get this mask instead of scored ones.
    """
    group = torch.arange(pattern.n) < pattern.k
    cols = torch.Size(shape[1:]).numel()
    return from_reduction_view(group.repeat(shape[0], cols // pattern.n), shape)


def _already_eligible(name: str, module: nn.Module, mask: torch.Tensor) -> None:
    return None


def imagenet_macs(pattern: Pattern) -> dict[str, MacReport]:
    """MACs of ViT-B/16 and ResNet-50 at 224 px with ``pattern`` on every prunable layer, and
    ViT-B/16 with token merging (r = 16) on top."""
    out = {}
    for name, build in IMAGENET_MODELS.items():
        with torch.device("meta"):
            model = build()
        layers, _ = pattern_layers(model, pattern)
        masks = {n: _tiled_mask(m.weight.shape, pattern) for n, m in layers.items()}
        # pattern_layers applied the swap's shape rules and the masks are k:n by construction,
        # so the (costly on 85 M weights) per-mask eligibility check can be skipped.
        options = {"masks": masks, "pattern": pattern, "eligible": _already_eligible}
        out[name] = macs(model, (1, 3, 224, 224), **options)
        if families.has_vit_blocks(model):
            out[f"{name} + ToMe r={TOME_R}"] = macs(model, (1, 3, 224, 224), tome_r=TOME_R, **options)
    return out


def _zeros_per_layer(model: nn.Module) -> dict[str, float]:
    swapped = sparse_layers(model)
    out = {}
    for name, module in model.named_modules():
        if name in swapped:
            out[name] = float((swapped[name].dense_weight() == 0).float().mean())
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            out[name] = float((module.weight == 0).float().mean())
    return out


def _digits_section(
    name: str, seed: int, pattern: Pattern, directory: Path, batch_sizes: Sequence[int], progress: bool
) -> ModelSection:
    data = load_digits_split(seed)
    model = pretrained(name, seed=seed, progress=progress)
    spectra = diagnose(model, directory / "mp" / name, progress=progress)
    config = PruneConfig(DEMO_METHOD[name], pattern, permute=True, repair="asr")
    outcome = prune_and_swap(model, config, data, REPAIR_EPOCHS[name], seed=seed, progress=progress)
    exported = export_onnx(model, data.x_test[:8], directory / "onnx" / f"{name}.onnx")
    weights = [c for c in check(exported.path) if c.consumer is not None]
    onnx_info = {
        "path": str(Path(exported.path).relative_to(directory)),
        "exporter": exported.exporter,
        "opset": exported.opset,
        "max_abs_diff": exported.max_abs_diff,
        "batch_sizes_checked": exported.batch_sizes_checked,
        "weights_24": sum(c.is_24 for c in weights),
        "weights": len(weights),
        "not_24": {c.layer or c.name: c.reason for c in weights if not c.is_24},
    }
    result = audit(model, (1, 8, 8), batch_sizes, checkpoint=name, progress=progress)
    result.save(directory / "audit", stem=name)
    return ModelSection(
        name, outcome, macs(model, (1, 1, 8, 8)), onnx_info, result, _zeros_per_layer(model), spectra
    )


def _gpu_audit(name: str, pattern: Pattern, batch_sizes: Sequence[int], directory: Path, progress: bool):
    torch.manual_seed(0)
    model = IMAGENET_MODELS[name]().eval()
    masks, _ = magnitude_masks(model, pattern)
    result = audit(
        model,
        (3, 224, 224),
        batch_sizes,
        torch.float16,
        plan=masks,
        pattern=pattern,
        checkpoint=f"{name} (random weights)",
        progress=progress,
    )
    result.save(directory / "audit", stem=name)
    return result


def plot_zeros(sections: Sequence[ModelSection], path: Path) -> Path:
    """Horizontal bars: fraction of zero weights per layer, one panel per model."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    heights = [max(2.5, 0.22 * len(s.zeros)) for s in sections]
    fig, axes = plt.subplots(1, len(sections), figsize=(6 * len(sections), max(heights)), squeeze=False)
    for ax, section in zip(axes[0], sections, strict=True):
        names = list(section.zeros)
        swapped = section.prune.swap.swapped
        colors = ["tab:blue" if n in swapped else "tab:grey" for n in names]
        ax.barh(range(len(names)), [section.zeros[n] for n in names], color=colors)
        ax.set_yticks(range(len(names)), names, fontsize=7)
        ax.invert_yaxis()
        ax.set_xlim(0, 1)
        ax.set_xlabel("fraction of zero weights")
        ax.set_title(f"{section.name}: blue = sparse module, grey = dense", fontsize=9)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.1f}%"


def _markdown(report: Report, env: dict) -> str:
    cpu_only = not report.gpu_audits
    lines = [
        "# knsparse demo report",
        "",
        f"{env['date']} on {env['device']}; torch {env['versions'].get('torch')}, "
        f"commit {env['commit']}; {report.seconds:.0f} s.",
        "",
        "Data: scikit-learn's bundled digits (1797 real 8x8 images, stratified 80/20 split); "
        "accuracies are on the held-out 20%. Pruning:",
        "",
        *[f"- {s.name}: {s.prune.describe()}" for s in report.sections],
    ]
    if cpu_only:
        lines += [
            "",
            "> No CUDA device: sparse layers ran the reference backend (masked dense math); "
            "no sparse tensor cores were measured. Speed-ups below are the reference path.",
        ]
    lines += [
        "",
        "## Accuracy and MACs",
        "",
        "| model | dense | pruned | after repair | swapped | sparse layers | dense MMACs/img "
        "| sparse MMACs/img | MAC reduction | theoretical speed-up |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for s in report.sections:
        p, m = s.prune, s.macs
        lines.append(
            f"| {s.name} | {_pct(p.accuracy_dense)} | {_pct(p.accuracy_pruned)} "
            f"| {_pct(p.accuracy_repaired)} "
            f"| {_pct(p.accuracy_swapped)} | {len(p.swap.swapped)} of {len(s.zeros)} "
            f"| {m.per_image(m.dense_total) / 1e6:.2f} | {m.per_image(m.sparse_total) / 1e6:.2f} "
            f"| {_pct(m.reduction)} | {m.theoretical_speedup:.2f}x |"
        )
    lines += [
        "",
        "Only layers a sparse backend executes count as reduced; attention matmuls and layers "
        "left dense count in full.",
        "",
        "## MACs at ImageNet shapes (224 px, batch 1)",
        "",
        "| model | dense GMACs | sparse-execution GMACs | reduction | theoretical speed-up |",
        "| --- | ---: | ---: | ---: | ---: |",
    ]
    for name, m in report.imagenet_macs.items():
        lines.append(
            f"| {name} | {m.unmerged_dense_total / 1e9:.2f} | {m.sparse_total / 1e9:.2f} "
            f"| {_pct(m.reduction)} "
            f"| {m.theoretical_speedup:.2f}x |"
        )
    lines += [
        "",
        "## Sparsity per layer",
        "",
        "![fraction of zero weights per layer](sparsity_per_layer.png)",
        "",
        "| model | layer left dense | why |",
        "| --- | --- | --- |",
    ]
    for s in report.sections:
        for layer, why in {**s.prune.not_prunable, **s.prune.swap.skipped}.items():
            lines.append(f"| {s.name} | {layer} | {why} |")
    lines += [
        "",
        "## Marchenko–Pastur fits of the dense layers",
        "",
        "Eigenvalues of WᵀW/N against the fitted MP law (bulk variance σ², spikes above the "
        "Tracy–Widom edge, share of eigenvalues in the bulk, KS distance of the fit); "
        "one ESD plot per layer.",
        "",
        "| model | layer | shape | σ² | spikes | bulk fraction | KS fit error | plot |",
        "| --- | --- | --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for s in report.sections:
        for row in s.spectra:
            plot = f"[png]({row.plot.relative_to(report.directory)})" if row.plot else "-"
            lines.append(
                f"| {s.name} | {row.name} | {'x'.join(map(str, row.weight_shape))} | {row.fit.sigma2:.3g} | "
                f"{row.fit.num_spikes} | {row.fit.bulk_fraction:.2f} | {row.fit.fit_error:.3f} | {plot} |"
            )
    lines += [
        "",
        "## ONNX export",
        "",
        "| model | file | exporter, opset | batch sizes checked | max abs diff, ORT CPU vs PyTorch "
        "| weights 2:4 on TensorRT's axis |",
        "| --- | --- | --- | --- | ---: | ---: |",
    ]
    for s in report.sections:
        o = s.onnx
        lines.append(
            f"| {s.name} | [{o['path']}]({o['path']}) | {o['exporter']}, {o['opset']} "
            f"| {o['batch_sizes_checked']} "
            f"| {o['max_abs_diff']['CPUExecutionProvider']:.2g} | {o['weights_24']} of {o['weights']} |"
        )
    lines += ["", "## Throughput audit", "", "![speed-up against batch size](speedup_vs_batch.png)"]
    for result in [s.audit for s in report.sections] + report.gpu_audits:
        lines += ["", f"### {result.checkpoint}", "", result.to_markdown()]
    lines += ["", "Everything above is also in [report.json](report.json)."]
    return "\n".join(lines) + "\n"


def build_report(
    directory: str | Path = "knsparse-report",
    seed: int = 0,
    pattern: str | Pattern = "2:4",
    batch_sizes: Sequence[int] = BATCH_SIZES,
    gpu: bool | None = None,
    progress: bool = True,
) -> Report:
    """Run the whole demo and write the report.

    Args:
        directory: output folder (created; files in it are overwritten).
        seed: data split and training seed.
        pattern: the k:n pattern.
        batch_sizes: batch sizes of the throughput audits.
        gpu: audit ViT-B/16 and ResNet-50 on CUDA (default: when CUDA is available).
        progress: progress bars.
    """
    pattern = Pattern.parse(pattern)
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.is_available() if gpu is None else gpu
    steps = [*DIGITS_MODELS, "ImageNet-shape MACs"] + (list(IMAGENET_MODELS) if gpu else [])
    start = time.perf_counter()
    sections, gpu_audits, imagenet = [], [], {}
    bar = tqdm(steps, desc="knsparse demo", disable=not progress)
    for step in bar:
        bar.set_postfix_str(step)
        if step in DIGITS_MODELS:
            with torch_threads(1):  # tiny matrices: a second thread costs more than it gives
                sections.append(_digits_section(step, seed, pattern, directory, batch_sizes, progress))
        elif step in IMAGENET_MODELS:
            gpu_audits.append(_gpu_audit(step, pattern, batch_sizes, directory, progress))
        else:
            imagenet = imagenet_macs(pattern)
    report = Report(directory, time.perf_counter() - start, sections, imagenet, gpu_audits)
    plot_zeros(sections, directory / "sparsity_per_layer.png")
    plot_speedup([s.audit for s in sections] + gpu_audits, directory / "speedup_vs_batch.png")
    env = environment()
    payload = {
        "environment": env,
        "seconds": report.seconds,
        "pattern": str(pattern),
        "models": [s.to_dict() for s in sections],
        "imagenet_macs": {k: v.to_dict() for k, v in imagenet.items()},
        "gpu_audits": [a.to_dict() for a in gpu_audits],
    }
    (directory / "report.json").write_text(json.dumps(payload, indent=2) + "\n")
    report.index.write_text(_markdown(report, env))
    return report
