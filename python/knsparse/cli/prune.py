"""``knsparse prune``: k:n masks, optional permutation and repair, swap to sparse modules, save."""

from __future__ import annotations

import argparse
from functools import partial

from ..app.images import ImageFolder, top1
from ..app.registry import DIGITS_MODELS, UserError, load_model
from ..utils import distributed
from .args import (
    at_least,
    augment_args,
    calibration_args,
    check_augment,
    model_args,
    quiet_arg,
    read_calibration,
    views_of,
    writable_file,
)
from .recipe import config_args, config_from_args, save_recipe


def run(args: argparse.Namespace) -> int:
    from ..app.data import load_digits_split
    from ..app.pipeline import prune_and_swap
    from ..sparse.fuse import fuse_activations
    from ..sparse.io import save_sparse

    out = writable_file(args.out)
    if args.save_recipe:
        writable_file(args.save_recipe, "--save-recipe")
    config = config_from_args(args)
    images = ImageFolder.scan(args.data) if args.data else None
    val = ImageFolder.scan(args.val, labelled=True) if args.val else None
    digits = args.model in DIGITS_MODELS
    if digits and (images or val):
        raise UserError(
            f"--data / --val are for models that take images; {args.model} uses the bundled digits"
        )
    if (args.augment or args.views is not None) and digits:
        raise UserError(f"--augment is for models that take images; {args.model} uses the bundled digits")
    check_augment(args, images is not None)
    if not digits and images is None and config.needs_calibration:
        raise UserError(
            f"method {config.method.name!r}"
            + (f" and repair {config.repair.method!r}" if config.repair else "")
            + " calibrate on images: give --data DIR"
        )
    if not digits and args.repair_epochs:
        raise UserError(
            "--repair-epochs fine-tunes on the bundled digits; fine-tune your own model on your "
            "images with 'knsparse finetune'"
        )
    with distributed.main_first():  # rank 0 trains/caches a built-in model once
        loaded = load_model(args.model, args.weights, args.seed)
    data = load_digits_split(args.seed) if digits else None
    calib = None
    chosen = images.sample(args.calib_images, seed=args.seed) if images is not None else None
    views = views_of(args, None if chosen is None else chosen.paths, loaded.preprocess)
    if views is not None:
        calib = views.batches(args.calib_batch)
        print(
            f"calibration: {len(views)} augmented views of {len(chosen)} image(s) from {images.root} "
            f"(seed {args.seed}, {views.backend} transforms)"
        )
    elif images is not None:
        calib = read_calibration(images, loaded.preprocess, args, args.quiet)
    evaluator = None if val is None else partial(top1, folder=val, preprocess=loaded.preprocess)
    outcome = prune_and_swap(
        loaded.model,
        config,
        data,
        args.repair_epochs,
        include=args.include,
        exclude=args.exclude,
        backend=args.backend,
        seed=args.seed,
        progress=not args.quiet,
        calib=calib,
        evaluator=evaluator,
    )
    fused = fuse_activations(loaded.model) if args.fuse_activations else {}
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        save_sparse(loaded.model, out, plan=outcome.prune_result.plan)
        saved = save_recipe(config, args.save_recipe)
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
            + (f", {config.quantize} {outcome.accuracy_quantized:.2%}" if config.quantize else "")
        )
    if outcome.quantization is not None:
        q = outcome.quantization
        errors = ", ".join(f"{k} {v:.3g}" for k, v in q.output_error.items())
        print(
            f"quantized {q.dtype} (fake-quantized, for evaluation; the file keeps the float sparse model): "
            f"{len(q.layers)} layers, activation scales by {q.activation_scale} (held-out relative "
            f"error {errors}; held out: {q.held_out}); 'knsparse export --quantize {q.dtype}' writes "
            "the Q/DQ ONNX"
        )
    print(outcome.swap)
    for name, why in outcome.not_prunable.items():
        print(f"  dense    {name:<32} {why}")
    for name, why in (outcome.prune_result.fallbacks() if outcome.prune_result else {}).items():
        print(f"  fallback {name:<32} {why}")
    auto = outcome.prune_result.dense_target if outcome.prune_result else None
    if auto is not None:
        print(auto.summary())
        print(auto.table(top=12))
    print(f"wrote {out} (load it with: --model {args.model} --weights {out})")
    if distributed.is_main() and saved is not None:
        print(f"wrote {saved} (replay with: knsparse prune --recipe {saved} ...)")
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``prune`` on the CLI's subparsers."""
    p = sub.add_parser(
        "prune",
        help="prune a model to k:n, swap in sparse modules, save as safetensors",
        description="k:n masks (magnitude, CAST, ...) on every Linear/Conv2d that can carry the pattern, "
        "optional channel permutation and ASR/BatchNorm repair, optional masked fine-tuning on the "
        "digits, swap to SparseLinear/SparseConv2d, save.",
    )
    model_args(p)
    config_args(p)
    calibration_args(p)
    augment_args(p, "calibrate")
    p.add_argument(
        "--val",
        metavar="DIR",
        help="a folder with one subfolder per class (sorted names are classes 0, 1, ...): top-1 "
        "before and after pruning",
    )
    p.add_argument(
        "--repair-epochs",
        type=at_least(0),
        default=0,
        help="masked fine-tuning epochs on the digits (default 0)",
    )
    p.add_argument(
        "--backend",
        default="auto",
        help="sparse backend of the swapped layers: auto or a name from knsparse.backends (default auto)",
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
    quiet_arg(p)
    p.set_defaults(func=run, distributed=True)
