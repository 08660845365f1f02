"""``knsparse inspect``: every Linear/Conv2d with its zeros, k:n status, backend, and the MACs."""

from __future__ import annotations

import argparse
import json

from torch import nn

from ..app.registry import load_model
from .args import at_least, model_args, pattern_arg


def run(args: argparse.Namespace) -> int:
    from ..core.layers import masks_from_zeros
    from ..deploy.macs import macs
    from ..sparse.densify import dense_copy
    from ..sparse.modules import sparse_layers

    loaded = load_model(args.model, args.weights, args.seed)
    model = loaded.model
    swapped = sparse_layers(model)
    held = masks_from_zeros(model, args.pattern)
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
            kn = str(args.pattern) if name in held else "-"
            rows.append((name, type(module).__name__, tuple(w.shape), w, kn, "dense"))
    report = macs(model, loaded.input_shape, tome_r=args.tome_r)
    spectra = []
    if args.spectra:  # on demand: an eigendecomposition of every prunable layer
        from ..pruning.spectral import diagnose

        spectra = [s.as_dict() for s in diagnose(dense_copy(model), args.spectra_plots, progress=False)]
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
        payload = {"model": loaded.description, "layers": layers, "macs": report.to_dict()}
        if args.spectra:
            payload["spectra"] = spectra
        print(json.dumps(payload, indent=2))
        return 0
    print(loaded.description)
    print(f"{'layer':<32} {'kind':<13} {'weight shape':<20} {'zeros':>7}  {'k:n':<6} runs as")
    for n, k, s, w, p, r in rows:
        print(f"{n:<32} {k:<13} {list(s)!s:<20} {float((w == 0).float().mean()):>7.1%}  {p:<6} {r}")
    print(f"MACs (input {loaded.input_shape}): {report.summary()}")
    if args.spectra:
        print(f"\n{'layer':<32} {'MP sigma^2':>11} {'spikes':>6} {'bulk':>5} {'KS':>6}")
        for row in spectra:
            print(
                f"{row['name']:<32} {row['sigma2']:>11.4g} {row['num_spikes']:>6} "
                f"{row['bulk_fraction']:>5.2f} {row['fit_error']:>6.3f}"
            )
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``inspect`` on the CLI's subparsers."""
    p = sub.add_parser(
        "inspect",
        help="per-layer shapes, zeros, k:n status, backend and MACs",
        description="List every Linear/Conv2d (sparse or dense) with its zeros, whether it "
        "is k:n, the backend that runs it, and the model's dense vs sparse MACs.",
    )
    model_args(p)
    p.add_argument(
        "--pattern",
        type=pattern_arg,
        default="2:4",
        help="k:n pattern to test dense layers for (default 2:4)",
    )
    p.add_argument(
        "--tome-r", type=at_least(0), default=0, help="count MACs with this many token merges per block"
    )
    p.add_argument(
        "--spectra",
        action="store_true",
        help="a Marchenko-Pastur fit of every prunable layer's weight spectrum (diagnostics on demand)",
    )
    p.add_argument("--spectra-plots", metavar="DIR", help="with --spectra: one PNG per layer in DIR")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=run)
