"""The prune configuration on the command line: every field of a
:class:`~knsparse.pruning.config.PruneConfig` as a flag, or the whole of it as ``--recipe FILE``
(a JSON recipe, as ``--save-recipe`` / ``PruneConfig.save`` write it)."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..app.registry import UserError
from ..core.pattern import CONV_ORDERS
from ..pruning.config import (
    REPAIRS,
    CalibrationConfig,
    DenseTarget,
    DiagnosticsConfig,
    MethodConfig,
    PermuteConfig,
    PruneConfig,
    RepairConfig,
)
from ..pruning.methods import METHODS
from .args import at_least, pattern_arg, quantize_arg, real

DEFAULT_METHOD = "magnitude"
"""The method of ``knsparse prune`` without ``--method`` or ``--recipe`` (needs no images)."""

_CONFIG_FLAGS = (
    "method", "pattern", "conv_order", "sparsity", "option", "no_reconstruct", "permute", "permute_option",
    "repair", "repair_option", "sequential", "spectra", "certificate", "lam1", "lam2", "lipschitz",
    "keep_dense", "target_agreement", "target_kl", "holdout_every", "max_dense", "quantize",
)  # fmt: skip


def key_value(text: str) -> tuple[str, object]:
    """argparse type: ``KEY=VALUE``, the value read as JSON (``0.01``, ``true``, ``"median"``)
    and as a plain string when it is not JSON."""
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        parsed: object = json.loads(value)
    except json.JSONDecodeError:
        parsed = value
    return key.strip(), parsed


def config_args(p: argparse.ArgumentParser) -> None:
    """The prune-configuration flags (each a field of ``PruneConfig``) and ``--recipe``."""
    g = p.add_argument_group(
        "prune configuration", "every field of a knsparse.PruneConfig; or all of them from --recipe"
    )
    g.add_argument("--recipe", metavar="FILE", help="a JSON recipe (PruneConfig.save / --save-recipe)")
    g.add_argument("--save-recipe", metavar="FILE", help="write the configuration that ran as a JSON recipe")
    g.add_argument(
        "--method",
        choices=[name for name, spec in METHODS.items() if spec.patterns != "unstructured"],
        help=f"k:n mask method from the registry (default {DEFAULT_METHOD}; those that calibrate "
        "need images)",
    )
    g.add_argument("--pattern", type=pattern_arg, help="k:n pattern, e.g. 2:4, 8:16, 2:4/crs (default 2:4)")
    g.add_argument(
        "--conv-order", choices=CONV_ORDERS, help="grouping of conv weights (default rsc, TensorRT's)"
    )
    g.add_argument(
        "--sparsity",
        type=real(low=0, high=1, high_open=True),
        help="cast/cast-conv: the unstructured pre-mask's sparsity before free restoration",
    )
    g.add_argument(
        "--option", action="append", type=key_value, metavar="KEY=VALUE", help="a method option (repeatable)"
    )
    g.add_argument(
        "--no-reconstruct",
        action="store_true",
        help="cast/cast-conv: keep CAST's masks without re-fitting the kept weights "
        "(--option reconstruct=false; a layer with fewer calibration rows than K skips the re-fit "
        "anyway, and the output says so)",
    )
    g.add_argument("--permute", action="store_true", help="permute channels before masking (function kept)")
    g.add_argument(
        "--permute-option",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="a channel-permutation search option, e.g. time_budget_s=2 (repeatable; implies --permute)",
    )
    g.add_argument(
        "--repair", choices=REPAIRS, help="repair after masking (asr, layerwise: + BatchNorm recalibration)"
    )
    g.add_argument(
        "--repair-option",
        action="append",
        type=key_value,
        metavar="KEY=VALUE",
        help="an ASR option (repeatable)",
    )
    g.add_argument(
        "--sequential", action="store_true", help="calibrate each layer on the already pruned ones"
    )
    g.add_argument("--spectra", action="store_true", help="Marchenko-Pastur fit of every layer in the report")
    g.add_argument("--certificate", action="store_true", help="the data-path certificate of every layer")
    for flag in ("--lam1", "--lam2"):
        g.add_argument(flag, type=real(low=0), help="certificate: elastic-net strength (default 1e-4)")
    g.add_argument("--lipschitz", type=real(low=0), help="certificate: Lipschitz constant (default 1)")
    g.add_argument(
        "--keep-dense",
        action="append",
        metavar="GLOB",
        help="never prune layers matching (repeatable); 'auto': keep the most harmful layers dense "
        "until --target-agreement / --target-kl holds",
    )
    g.add_argument(
        "--target-agreement",
        type=real(low=0, high=1, low_open=True),
        help="keep-dense auto: top-1 agreement with the dense model to reach on held-out calibration "
        "batches (implies --keep-dense auto)",
    )
    g.add_argument(
        "--target-kl",
        type=real(low=0),
        help="keep-dense auto: mean KL(dense||pruned) of the logits to stay within (implies it)",
    )
    g.add_argument(
        "--holdout-every",
        type=at_least(2),
        help="keep-dense auto: every N-th calibration batch is held out for the target (default 4)",
    )
    g.add_argument(
        "--max-dense", type=at_least(0), help="keep-dense auto: at most this many layers kept dense"
    )
    quantize_arg(g)


def config_from_args(args: argparse.Namespace) -> PruneConfig:
    """The :class:`PruneConfig` the flags (or ``--recipe``) describe; a ``UserError`` names a
    flag given beside ``--recipe`` or a field that does not validate."""
    given = [f for f in _CONFIG_FLAGS if getattr(args, f, None) not in (None, False)]
    try:
        if args.recipe:
            if given:
                flags = ", ".join("--" + f.replace("_", "-") for f in given)
                raise UserError(
                    f"--recipe holds the whole configuration; remove {flags} (or edit the recipe)"
                )
            return PruneConfig.load(args.recipe)
        return _from_flags(args)
    except (ValueError, TypeError) as exc:
        raise UserError(str(exc)) from None


def _from_flags(args: argparse.Namespace) -> PruneConfig:
    options = dict(args.option or ())
    if args.no_reconstruct:
        if args.method not in ("cast", "cast-conv"):
            raise UserError(f"--no-reconstruct is a cast/cast-conv option, not one of --method {args.method}")
        options["reconstruct"] = False
    pattern = args.pattern if args.pattern is not None else "2:4"
    if args.conv_order is not None:
        from ..core.pattern import Pattern

        pattern = Pattern.parse(pattern, args.conv_order)
    permute = None
    if args.permute or args.permute_option:
        permute = PermuteConfig(dict(args.permute_option or ()))
    repair = None
    if args.repair:
        repair = RepairConfig(args.repair, dict(args.repair_option or ()))
    elif args.repair_option:
        raise UserError("--repair-option needs --repair")
    certificate = args.certificate or any(v is not None for v in (args.lam1, args.lam2, args.lipschitz))
    defaults = DiagnosticsConfig()
    diagnostics = DiagnosticsConfig(
        spectra=args.spectra,
        certificate=certificate,
        lam1=defaults.lam1 if args.lam1 is None else args.lam1,
        lam2=defaults.lam2 if args.lam2 is None else args.lam2,
        lipschitz=defaults.lipschitz if args.lipschitz is None else args.lipschitz,
    )
    globs = [g for g in args.keep_dense or () if g != "auto"]
    auto = (
        "auto" in (args.keep_dense or ()) or args.target_agreement is not None or args.target_kl is not None
    )
    dense_target = None
    if auto:
        if args.target_agreement is None and args.target_kl is None:
            raise UserError("--keep-dense auto needs --target-agreement and/or --target-kl")
        every = {} if args.holdout_every is None else {"holdout_every": args.holdout_every}
        dense_target = DenseTarget(args.target_agreement, args.target_kl, max_dense=args.max_dense, **every)
    elif args.holdout_every is not None or args.max_dense is not None:
        raise UserError(
            "--holdout-every / --max-dense are keep-dense auto options: give --target-agreement / --target-kl"
        )
    return PruneConfig(
        MethodConfig(args.method or DEFAULT_METHOD, options),
        pattern,
        args.sparsity,
        permute,
        repair,
        CalibrationConfig(args.sequential),
        diagnostics,
        tuple(globs),
        dense_target,
        args.quantize,
    )


def save_recipe(config: PruneConfig, path: str | None) -> Path | None:
    """Write ``config`` to ``path`` (``--save-recipe``), if one was given."""
    return None if path is None else config.save(path)
