"""The ``knsparse`` command line: ``prune | inspect | export | audit | demo``.

A thin shell over the library. A mistake on the user's side (a missing file, a bad pattern,
an unknown model or layer) prints one line and exits with status 2, without a traceback
(``KNSPARSE_DEBUG=1`` shows it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

MODELS_HELP = (
    "vit_tiny_digits and resnet_tiny_digits (trained on the bundled digits, cached), "
    "vit_base_patch16_224 and resnet50 (ImageNet shapes, random weights), or timm:<name> "
    "(random weights; needs timm)"
)


class UserError(ValueError):
    """A mistake in the command line: reported in one line, exit status 2."""


@dataclass
class LoadedModel:
    model: nn.Module
    input_shape: tuple[int, int, int]  # (C, H, W)
    description: str


def _builtin(name: str, seed: int, weights: bool) -> LoadedModel:
    from . import models

    digits = {"vit_tiny_digits": models.vit_tiny_digits, "resnet_tiny_digits": models.resnet_tiny_digits}
    imagenet = {"vit_base_patch16_224": models.vit_base_patch16_224, "resnet50": models.resnet50}
    if name in digits:
        if weights:  # the file supplies the weights: no need to train
            return LoadedModel(digits[name]().eval(), (1, 8, 8), name)
        return LoadedModel(
            models.pretrained(name, seed=seed), (1, 8, 8), f"{name} (trained on digits, seed {seed})"
        )
    if name in imagenet:
        torch.manual_seed(seed)
        return LoadedModel(imagenet[name]().eval(), (3, 224, 224), f"{name} (random weights)")
    if name.startswith("timm:"):
        try:
            import timm
        except Exception as exc:  # timm or its torchvision dependency missing or broken
            raise UserError(f"model {name!r} needs timm (pip install 'knsparse[timm]'): {exc}") from exc
        try:
            model = timm.create_model(name.removeprefix("timm:"), pretrained=False).eval()
        except RuntimeError as exc:
            raise UserError(f"timm has no model {name.removeprefix('timm:')!r}") from exc
        c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
        return LoadedModel(model, (c, h, w), f"{name} (random weights)")
    raise UserError(f"unknown model {name!r}; choose {MODELS_HELP}")


def load_model(name: str, weights: str | None = None, seed: int = 0) -> LoadedModel:
    """A built-in or timm model, with ``weights`` (a ``knsparse prune`` output or a plain
    safetensors state dict of that architecture) loaded when given."""
    path = None if weights is None else Path(weights)
    if path is not None and not path.is_file():
        raise UserError(f"no weights file at {path}")
    loaded = _builtin(name, seed, path is not None)
    if path is None:
        return loaded
    from safetensors import safe_open

    from .io import load_sparse

    try:
        with safe_open(str(path), framework="pt") as f:
            has_sparse = "knsparse.sparse_layers" in (f.metadata() or {})
        if has_sparse:
            load_sparse(loaded.model, path)
        else:
            from safetensors.torch import load_file

            loaded.model.load_state_dict(load_file(str(path)))
    except (RuntimeError, KeyError, OSError) as exc:  # safetensors / load_state_dict mismatches
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} does not fit model {name!r}: {first}") from exc
    loaded.description = f"{name} with weights from {path}"
    return loaded


def _batch_sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as exc:
        raise argparse.ArgumentTypeError(
            f"batch sizes must be comma-separated integers, got {text!r}"
        ) from exc
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"batch sizes must be positive, got {text!r}")
    return sizes


def _pattern(text: str) -> str:
    from .pattern import Pattern

    try:
        pattern = Pattern.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc
    if pattern.is_unstructured:
        raise argparse.ArgumentTypeError(
            "a sparse backend needs a k:n pattern such as 2:4, not 'unstructured'"
        )
    return str(pattern)


_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


# ------------------------------------------------------------------------------ commands


def _kn_methods() -> list[str]:
    """The registry's methods that produce k:n masks."""
    from .methods import METHODS

    return sorted(m for m, spec in METHODS.items() if spec.patterns != "unstructured")


def _cmd_prune(args: argparse.Namespace) -> int:
    from .fuse import fuse_activations
    from .io import save_sparse
    from .models import load_digits_split
    from .pipeline import prune_and_swap

    loaded = load_model(args.model, args.weights, args.seed)
    digits = loaded.input_shape == (1, 8, 8)
    from .methods import METHODS

    if (args.repair_epochs or args.repair or METHODS[args.method].calib == "required") and not digits:
        raise UserError(
            f"--repair-epochs, --repair and --method {args.method} calibrate on the bundled digits: "
            "use them with a *_digits model"
        )
    data = load_digits_split(args.seed) if digits else None
    outcome = prune_and_swap(
        loaded.model,
        args.pattern,
        data,
        args.repair_epochs,
        method=args.method,
        permute=args.permute,
        repair=args.repair,
        include=args.include,
        exclude=args.exclude,
        seed=args.seed,
        progress=not args.quiet,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    fused = fuse_activations(loaded.model) if args.fuse_activations else {}
    save_sparse(loaded.model, out)
    print(f"{loaded.description}: {outcome.describe()}")
    if args.fuse_activations:
        print(f"fused the activation into {len(fused)} MLP fc1 layer(s): {', '.join(fused) or '-'}")
    if data is not None:
        print(
            f"test accuracy: dense {outcome.accuracy_dense:.2%}, pruned {outcome.accuracy_pruned:.2%}"
            + (f", repaired {outcome.accuracy_repaired:.2%}" if args.repair_epochs else "")
            + f", swapped {outcome.accuracy_swapped:.2%}"
        )
    print(outcome.swap)
    for name, why in outcome.not_prunable.items():
        print(f"  dense    {name:<32} {why}")
    print(f"wrote {out} (load it with: --model {args.model} --weights {out})")
    return 0


def _cmd_inspect(args: argparse.Namespace) -> int:
    from .macs import macs
    from .masks import is_nm
    from .modules import sparse_layers

    loaded = load_model(args.model, args.weights, args.seed)
    model = loaded.model
    swapped = sparse_layers(model)
    rows = []
    for name, module in model.named_modules():
        if name in swapped:
            layer = swapped[name]
            w = layer.dense_weight()
            rows.append(
                (name, type(layer).__name__, tuple(w.shape), w, str(layer.pattern), layer.active_backend)
            )
        elif isinstance(module, (nn.Linear, nn.Conv2d)):
            w = module.weight.detach()
            kn = args.pattern if bool((w == 0).any()) and is_nm(w, args.pattern) else "-"
            rows.append((name, type(module).__name__, tuple(w.shape), w, kn, "dense"))
    report = macs(model, loaded.input_shape, tome_r=args.tome_r)
    if args.json:
        layers = [
            {
                "layer": n,
                "kind": k,
                "shape": list(s),
                "zeros": float((w == 0).float().mean()),
                "pattern": p,
                "runs": r,
            }
            for n, k, s, w, p, r in rows
        ]
        print(json.dumps({"model": loaded.description, "layers": layers, "macs": report.to_dict()}, indent=2))
        return 0
    print(loaded.description)
    print(f"{'layer':<32} {'kind':<13} {'weight shape':<20} {'zeros':>7}  {'k:n':<6} runs as")
    for n, k, s, w, p, r in rows:
        print(f"{n:<32} {k:<13} {list(s)!s:<20} {float((w == 0).float().mean()):>7.1%}  {p:<6} {r}")
    print(f"MACs (input {loaded.input_shape}): {report.summary()}")
    return 0


def _cmd_export(args: argparse.Namespace) -> int:
    from .export import check, check_markdown, export_onnx

    if args.check:
        if args.model or args.out:
            raise UserError(
                "--check reads an existing ONNX file: give it alone (knsparse export --check FILE)"
            )
        print(check_markdown(check(args.check), weights_only=not args.all_initializers))
        return 0
    if not args.model or not args.out:
        raise UserError("export needs --model and --out (or --check FILE to inspect an ONNX file)")
    from . import tome

    loaded = load_model(args.model, args.weights, args.seed)
    if args.tome_r:
        tome.apply(loaded.model, args.tome_r)
    x = torch.randn((args.batch, *loaded.input_shape), generator=torch.Generator().manual_seed(0))
    result = export_onnx(
        loaded.model,
        x,
        args.out,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        check=not args.no_check,
        exporter=args.exporter,
    )
    print(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset})")
    for provider, diff in result.max_abs_diff.items():
        print(
            f"  {provider}: max |ONNX Runtime - PyTorch| = {diff:.3g} "
            f"(batch sizes {result.batch_sizes_checked})"
        )
    if not args.no_check:
        weights = [c for c in check(result.path) if c.consumer is not None]
        print(
            f"  {sum(c.is_24 for c in weights)} of {len(weights)} weight initializers are 2:4 "
            "on TensorRT's reduction axis "
            f"(details: knsparse export --check {result.path})"
        )
    return 0


def _cmd_audit(args: argparse.Namespace) -> int:
    from .audit import audit
    from .modules import sparse_layers
    from .pipeline import magnitude_masks

    loaded = load_model(args.model, args.weights, args.seed)
    masks = None
    has_zeros = any(
        bool((m.weight == 0).any()) for m in loaded.model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    if not sparse_layers(loaded.model) and not has_zeros:
        masks, _ = magnitude_masks(loaded.model, args.pattern)
        print(f"{args.model} has no sparse layers: auditing {args.pattern} magnitude masks of its weights")
    result = audit(
        loaded.model,
        loaded.input_shape,
        args.batch_sizes,
        _DTYPES[args.dtype],
        args.backend,
        args.tome_r,
        masks=masks,
        pattern=args.pattern,
        checkpoint=args.model,
        repeats=args.repeats,
        progress=not args.quiet,
        fuse_activations=args.fuse_activations,
    )
    print(result.to_markdown())
    paths = result.save(args.out, stem=args.model.replace(":", "_"))
    print(f"wrote {', '.join(str(p) for p in paths.values())}")
    return 0


def _cmd_demo(args: argparse.Namespace) -> int:
    from .report import build_report

    report = build_report(
        args.out, seed=args.seed, pattern=args.pattern, batch_sizes=args.batch_sizes, progress=not args.quiet
    )
    for s in report.sections:
        p = s.prune
        print(
            f"{s.name:<20} accuracy dense {p.accuracy_dense:.2%} -> {p.pattern} {p.accuracy_swapped:.2%}; "
            f"MACs -{s.macs.reduction:.1%}; "
            f"ONNX max diff {s.onnx['max_abs_diff']['CPUExecutionProvider']:.1g}"
        )
    if not report.gpu_audits:
        print(
            "No CUDA device: sparse layers ran the reference backend; no sparse tensor cores were measured."
        )
    print(f"report: {report.index} ({report.seconds:.0f} s)")
    return 0


# -------------------------------------------------------------------------------- parser


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=f"the architecture: {MODELS_HELP}")
    p.add_argument(
        "--weights", help="safetensors file to load into it (a 'knsparse prune' output or a state dict)"
    )
    p.add_argument(
        "--seed", type=int, default=0, help="data split / training / random-weights seed (default 0)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knsparse",
        description="k:n / 2:4 semi-structured sparse inference for vision models: prune, inspect, "
        "export to ONNX/TensorRT and audit dense vs sparse throughput.",
        epilog="Run 'knsparse <command> --help' for the options of each command.",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="{prune,inspect,export,audit,demo}")

    p = sub.add_parser(
        "prune",
        help="prune a model to k:n, swap in sparse modules, save as safetensors",
        description="k:n masks (magnitude, CAST, ...) on every Linear/Conv2d that can carry the pattern, "
        "optional channel permutation and ASR/BatchNorm repair, optional masked fine-tuning on the "
        "digits, swap to SparseLinear/SparseConv2d, save.",
    )
    _model_args(p)
    p.add_argument("--pattern", type=_pattern, default="2:4", help="k:n pattern (default 2:4)")
    p.add_argument(
        "--method",
        default="magnitude",
        choices=_kn_methods(),
        help="mask method from the registry (data-aware ones calibrate on the digits; default magnitude)",
    )
    p.add_argument("--permute", action="store_true", help="permute channels before masking (function kept)")
    p.add_argument(
        "--repair",
        choices=["asr", "layerwise", "bn"],
        help="post-pruning repair on the digits calibration set",
    )
    p.add_argument(
        "--repair-epochs", type=int, default=0, help="masked fine-tuning epochs on the digits (default 0)"
    )
    p.add_argument(
        "--include", action="append", metavar="GLOB", help="only swap layers matching (repeatable)"
    )
    p.add_argument(
        "--exclude", action="append", metavar="GLOB", help="never swap layers matching (repeatable)"
    )
    p.add_argument(
        "--fuse-activations",
        action="store_true",
        help="move each ViT MLP's GELU/ReLU into its sparse fc1 (fused in knsparse-cuda's GEMM "
        "epilogue; the saved file carries it)",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_prune)

    p = sub.add_parser(
        "inspect",
        help="per-layer shapes, zeros, k:n status, backend and MACs",
        description="List every Linear/Conv2d (sparse or dense) with its zeros, whether it "
        "is k:n, the backend that runs it, and the model's dense vs sparse MACs.",
    )
    _model_args(p)
    p.add_argument(
        "--pattern", type=_pattern, default="2:4", help="k:n pattern to test dense layers for (default 2:4)"
    )
    p.add_argument("--tome-r", type=int, default=0, help="count MACs with this many token merges per block")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=_cmd_inspect)

    p = sub.add_parser(
        "export",
        help="export to ONNX with parity check, or --check an ONNX file for TensorRT 2:4",
        description="Export a (pruned) model to ONNX: sparse layers become MatMul/Gemm/Conv "
        "with dense initializers holding the zeros; the ONNX checker and ONNX Runtime parity "
        "run unless --no-check. With --check FILE, list every initializer of FILE and "
        "whether it is 2:4 along TensorRT's reduction axis, and why not.",
    )
    _model_args(p, required=False)
    p.add_argument("--out", help="output .onnx file")
    p.add_argument("--check", metavar="FILE", help="check an existing ONNX file instead of exporting")
    p.add_argument(
        "--all-initializers", action="store_true", help="with --check: list biases and other constants too"
    )
    p.add_argument("--opset", type=int, default=17, help="ONNX opset, >= 17 (default 17)")
    p.add_argument("--batch", type=int, default=2, help="batch size of the example input (default 2)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis")
    p.add_argument(
        "--no-check", action="store_true", help="skip the ONNX checker and the ONNX Runtime parity run"
    )
    p.add_argument(
        "--exporter",
        choices=("auto", "torchscript", "dynamo"),
        default="auto",
        help="torch exporter (default auto: TorchScript, then dynamo)",
    )
    p.add_argument("--tome-r", type=int, default=0, help="export with this many token merges per block (ViT)")
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser(
        "audit",
        help="dense vs sparse images/s per batch size (markdown, JSON, PNG)",
        description="Time the same weights dense and sparse at each batch size (CUDA graphs "
        "on GPU, medians with 10-90%% ranges). A model without sparsity is audited with "
        "magnitude masks of --pattern. On CPU the reference path runs in float32 and no "
        "sparse tensor cores are measured.",
    )
    _model_args(p)
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=(1, 8, 32, 64, 128),
        help="comma-separated (default 1,8,32,64,128)",
    )
    p.add_argument(
        "--dtype", choices=tuple(_DTYPES), default="float16", help="CUDA compute dtype (default float16)"
    )
    p.add_argument("--backend", default="auto", help="sparse backend: auto or a name from knsparse.backends")
    p.add_argument("--pattern", type=_pattern, default="2:4", help="k:n pattern (default 2:4)")
    p.add_argument("--tome-r", type=int, default=0, help="token merges per block for both copies (ViT)")
    p.add_argument(
        "--repeats", type=int, default=None, help="timed measurements per batch (default 20 GPU, 5 CPU)"
    )
    p.add_argument(
        "--fuse-activations",
        action="store_true",
        help="fuse each ViT MLP's GELU/ReLU into its sparse fc1 in the sparse copy (dense copy unfused)",
    )
    p.add_argument("--out", default="knsparse-audit", help="output folder (default knsparse-audit)")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_audit)

    p = sub.add_parser(
        "demo",
        help="the main job: train, prune, measure, export, audit; write knsparse-report/",
        description="Train (or reuse) the built-in ViT and ResNet on the bundled digits, prune "
        "them, report accuracy, MACs, ONNX parity and the throughput audit in "
        "knsparse-report/ (markdown, PNG, JSON). With CUDA also audits ViT-B/16 and ResNet-50.",
    )
    p.add_argument("--out", default="knsparse-report", help="report folder (default knsparse-report)")
    p.add_argument("--seed", type=int, default=0, help="data split and training seed (default 0)")
    p.add_argument("--pattern", type=_pattern, default="2:4", help="k:n pattern (default 2:4)")
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=(1, 8, 32, 64, 128),
        help="audit batch sizes, comma-separated (default 1,8,32,64,128)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .backends import BackendUnavailableError
    from .export import ParityError

    args = build_parser().parse_args(argv)
    handled: tuple[type[BaseException], ...] = (
        UserError,
        ValueError,
        TypeError,
        FileNotFoundError,
        BackendUnavailableError,
        ParityError,
    )
    try:
        return args.func(args)
    except handled as err:
        if os.environ.get("KNSPARSE_DEBUG"):
            raise
        message = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        print(f"knsparse {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"knsparse {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
