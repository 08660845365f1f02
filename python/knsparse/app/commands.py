"""The ``knsparse`` commands: each takes the parsed arguments and returns the exit status."""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Callable
from functools import partial
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from .. import distributed
from ..checks import check_number
from ..methods import METHODS
from .images import ImageFolder, top1
from .registry import DIGITS_MODELS, UserError, load_model


def at_least(minimum: int) -> Callable[[str], int]:
    """argparse type: an int >= ``minimum``."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def real(**bounds: object) -> Callable[[str], float]:
    """argparse type: a finite float within ``bounds`` (:func:`knsparse.checks.check_number`'s)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number, got {text!r}") from None
        try:
            return check_number(value, "the value", **bounds)
        except ValueError as exc:
            raise argparse.ArgumentTypeError(str(exc).removeprefix("the value ")) from None

    parse.__name__ = "number"
    return parse


def _creatable(folder: Path, flag: str) -> None:
    existing = folder
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise UserError(f"{flag}: {existing} is a file, so {folder} cannot be created")
    try:  # a real write: permission bits do not bind root, and /proc or a read-only mount refuse anyway
        tempfile.TemporaryFile(dir=existing).close()
    except OSError as exc:
        raise UserError(f"{flag}: cannot write into {existing} ({exc.strerror or exc})") from None


def writable_file(path: str, flag: str = "--out") -> Path:
    """``path`` as a file this run can write (not a folder, its folder creatable), else ``UserError``:
    checked before any work starts."""
    out = Path(path)
    if out.is_dir():
        raise UserError(f"{flag} {out} is a folder; give a file name")
    _creatable(out.parent, flag)
    return out


def writable_folder(path: str, flag: str = "--out") -> Path:
    """``path`` as a folder this run can create or write into, else ``UserError``."""
    out = Path(path)
    if out.exists() and not out.is_dir():
        raise UserError(f"{flag} {out} is an existing file; give a folder")
    _creatable(out, flag)
    return out


DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def prune(args: argparse.Namespace) -> int:
    from ..fuse import fuse_activations
    from ..io import save_sparse
    from .data import load_digits_split
    from .pipeline import prune_and_swap

    out = writable_file(args.out)
    images = ImageFolder.scan(args.data) if args.data else None
    val = ImageFolder.scan(args.val, labelled=True) if args.val else None
    digits = args.model in DIGITS_MODELS
    calibrates = METHODS[args.method].calib != "unused"
    if digits and (images or val):
        raise UserError(
            f"--data / --val are for models that take images; {args.model} uses the bundled digits"
        )
    if args.no_reconstruct and args.method not in ("cast", "cast-conv"):
        raise UserError(f"--no-reconstruct is a cast/cast-conv option, not one of --method {args.method}")
    if not digits and images is None and (args.repair or calibrates):
        raise UserError(f"--method {args.method} and --repair calibrate on images: give --data DIR")
    if not digits and args.repair_epochs:
        raise UserError(
            "--repair-epochs fine-tunes on the bundled digits; fine-tune your own model on your "
            "images with 'knsparse finetune'"
        )
    with distributed.main_first():  # rank 0 trains/caches a built-in model once
        loaded = load_model(args.model, args.weights, args.seed)
    data = load_digits_split(args.seed) if digits else None
    calib = None
    if images is not None:
        chosen = images.sample(args.calib_images, seed=args.seed)
        calib = list(
            tqdm(
                chosen.batches(loaded.preprocess, args.calib_batch),
                desc="read images",
                disable=args.quiet,
                total=-(-len(chosen) // args.calib_batch),
            )
        )
    evaluator = None if val is None else partial(top1, folder=val, preprocess=loaded.preprocess)
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
        calib=calib,
        evaluator=evaluator,
        method_options={"reconstruct": False} if args.no_reconstruct else None,
    )
    fused = fuse_activations(loaded.model) if args.fuse_activations else {}
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_sparse(loaded.model, out)
    distributed.barrier()
    print(f"{loaded.description}: {outcome.describe()}")
    if args.fuse_activations:
        print(f"fused the activation into {len(fused)} MLP fc1 layer(s): {', '.join(fused) or '-'}")
    if outcome.accuracy_dense is not None:
        where = "test" if data is not None else f"top-1 on {val.root} ({len(val)} images)"
        print(
            f"{where} accuracy: dense {outcome.accuracy_dense:.2%}, pruned {outcome.accuracy_pruned:.2%}"
            + (f", repaired {outcome.accuracy_repaired:.2%}" if args.repair_epochs else "")
            + f", swapped {outcome.accuracy_swapped:.2%}"
        )
    print(outcome.swap)
    for name, why in outcome.not_prunable.items():
        print(f"  dense    {name:<32} {why}")
    print(f"wrote {out} (load it with: --model {args.model} --weights {out})")
    return 0


def inspect(args: argparse.Namespace) -> int:
    from ..macs import macs
    from ..masks import is_nm
    from ..modules import sparse_layers

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


def export(args: argparse.Namespace) -> int:
    from ..export import check, check_markdown, export_onnx

    if args.check:
        if args.model or args.out:
            raise UserError(
                "--check reads an existing ONNX file: give it alone (knsparse export --check FILE)"
            )
        print(check_markdown(check(args.check), weights_only=not args.all_initializers))
        return 0
    if not args.model or not args.out:
        raise UserError("export needs --model and --out (or --check FILE to inspect an ONNX file)")
    from .. import tome

    writable_file(args.out)
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
        dtype=args.dtype,
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


def audit(args: argparse.Namespace) -> int:
    from ..audit import audit
    from ..masks import is_nm
    from ..methods.magnitude import magnitude_masks
    from ..modules import sparse_layers

    writable_folder(args.out)
    loaded = load_model(args.model, args.weights, args.seed)
    masks = None
    pruned = any(
        bool((m.weight == 0).any()) and is_nm(m.weight, args.pattern)
        for m in loaded.model.modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    )
    if not sparse_layers(loaded.model) and not pruned:
        masks, _ = magnitude_masks(loaded.model, args.pattern)
        print(f"{args.model} has no sparse layers: auditing {args.pattern} magnitude masks of its weights")
    result = audit(
        loaded.model,
        loaded.input_shape,
        args.batch_sizes,
        DTYPES[args.dtype],
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


def demo(args: argparse.Namespace) -> int:
    from .report import build_report

    writable_folder(args.out)
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
