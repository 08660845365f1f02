"""``knsparse audit``: dense vs sparse images/s per batch size (markdown, JSON, PNG)."""

from __future__ import annotations

import argparse

from ..app.registry import load_model
from ..core.checks import FLOAT_DTYPES
from .args import at_least, batch_sizes_arg, model_args, pattern_arg, quiet_arg, writable_folder


def run(args: argparse.Namespace) -> int:
    from ..core.layers import masks_from_zeros
    from ..deploy.audit import audit
    from ..pruning.methods.magnitude import magnitude_masks
    from ..sparse.modules import sparse_layers

    writable_folder(args.out)
    loaded = load_model(args.model, args.weights, args.seed)
    masks = None
    if not sparse_layers(loaded.model) and not masks_from_zeros(loaded.model, args.pattern):
        masks, _ = magnitude_masks(loaded.model, args.pattern)
        print(f"{args.model} has no sparse layers: auditing {args.pattern} magnitude masks of its weights")
    result = audit(
        loaded.model,
        loaded.input_shape,
        args.batch_sizes,
        FLOAT_DTYPES[args.dtype],
        args.backend,
        args.tome_r,
        plan=masks,
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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``audit`` on the CLI's subparsers."""
    p = sub.add_parser(
        "audit",
        help="dense vs sparse images/s per batch size (markdown, JSON, PNG)",
        description="Time the same weights dense and sparse at each batch size (CUDA graphs "
        "on GPU, medians with 10-90%% ranges). A model without sparsity is audited with "
        "magnitude masks of --pattern. On CPU the reference path runs in float32 and no "
        "sparse tensor cores are measured.",
    )
    model_args(p)
    p.add_argument(
        "--batch-sizes",
        type=batch_sizes_arg,
        default=(1, 8, 32, 64, 128),
        help="comma-separated (default 1,8,32,64,128)",
    )
    p.add_argument(
        "--dtype",
        choices=tuple(FLOAT_DTYPES),
        default="float16",
        help="CUDA compute dtype (default float16)",
    )
    p.add_argument("--backend", default="auto", help="sparse backend: auto or a name from knsparse.backends")
    p.add_argument("--pattern", type=pattern_arg, default="2:4", help="k:n pattern (default 2:4)")
    p.add_argument(
        "--tome-r", type=at_least(0), default=0, help="token merges per block for both copies (ViT)"
    )
    p.add_argument(
        "--repeats",
        type=at_least(1),
        default=None,
        help="timed measurements per batch (default 20 GPU, 5 CPU)",
    )
    p.add_argument(
        "--fuse-activations",
        action="store_true",
        help="fuse each ViT MLP's GELU/ReLU into its sparse fc1 in the sparse copy (dense copy unfused)",
    )
    p.add_argument("--out", default="knsparse-audit", help="output folder (default knsparse-audit)")
    quiet_arg(p)
    p.set_defaults(func=run)
