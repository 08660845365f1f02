"""The ``knsparse`` command line."""

from __future__ import annotations

import argparse
import sys

import torch
from torch import nn


def _magnitude_masks(model: nn.Module, pattern: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    from .masks import nm_mask

    masks, skipped = {}, {}
    for name, module in model.named_modules():
        if isinstance(module, (nn.Linear, nn.Conv2d)):
            try:
                masks[name] = nm_mask(module.weight.detach().abs(), pattern, name=name)
            except ValueError as err:
                skipped[name] = str(err)
    return masks, skipped


def _demo(args: argparse.Namespace) -> int:
    from .masks import sparsity_of
    from .models import evaluate, load_digits_split, pretrained
    from .modules import sparse_layers, swap_modules

    torch.manual_seed(args.seed)
    data = load_digits_split(args.seed)
    print(
        f"knsparse demo: built-in models on scikit-learn's bundled digits (seed {args.seed}), {args.pattern}"
    )
    rows = []
    for name in ("vit_tiny_digits", "resnet_tiny_digits"):
        model = pretrained(name, seed=args.seed)
        dense_acc = evaluate(model, data.x_test, data.y_test)
        masks, not_carried = _magnitude_masks(model, args.pattern)
        report = swap_modules(model, masks, pattern=args.pattern)
        sparse_acc = evaluate(model, data.x_test, data.y_test)
        rows.append((name, dense_acc, sparse_acc))
        print(f"\n{name}: dense {dense_acc:.2%} -> {args.pattern} magnitude {sparse_acc:.2%}")
        for lname, layer in sparse_layers(model).items():
            print(f"  {lname:<28} sparsity {sparsity_of(layer.mask()):6.1%}  backend {layer.active_backend}")
        for lname, reason in {**not_carried, **report.skipped}.items():
            print(f"  {lname:<28} dense: {reason}")
    print("\nmodel                 dense acc   sparse acc")
    for name, d, s in rows:
        print(f"{name:<20} {d:10.2%} {s:12.2%}")
    if not torch.cuda.is_available():
        print("\nNo CUDA device: sparse layers ran the reference backend (masked dense).")
        print("No sparse tensor cores were measured.")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="knsparse", description="k:n / 2:4 sparse inference for vision models"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser(
        "demo", help="train (or reuse) the built-in models on the bundled digits and prune them"
    )
    demo.add_argument("--seed", type=int, default=0, help="data split and training seed (default 0)")
    demo.add_argument("--pattern", default="2:4", help="k:n pattern (default 2:4)")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        print(f"knsparse {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
