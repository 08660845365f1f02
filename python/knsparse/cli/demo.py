"""``knsparse demo``: the main job on the bundled digits; writes knsparse-report/."""

from __future__ import annotations

import argparse

from .args import at_least, batch_sizes_arg, pattern_arg, quiet_arg, writable_folder


def run(args: argparse.Namespace) -> int:
    from ..app.report import build_report

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


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``demo`` on the CLI's subparsers."""
    p = sub.add_parser(
        "demo",
        help="the main job: train, prune, measure, export, audit; write knsparse-report/",
        description="Train (or reuse) the built-in ViT and ResNet on the bundled digits, prune "
        "them, report accuracy, MACs, ONNX parity and the throughput audit in "
        "knsparse-report/ (markdown, PNG, JSON). With CUDA also audits ViT-B/16 and ResNet-50.",
    )
    p.add_argument("--out", default="knsparse-report", help="report folder (default knsparse-report)")
    p.add_argument("--seed", type=at_least(0), default=0, help="data split and training seed (default 0)")
    p.add_argument("--pattern", type=pattern_arg, default="2:4", help="k:n pattern (default 2:4)")
    p.add_argument(
        "--batch-sizes",
        type=batch_sizes_arg,
        default=(1, 8, 32, 64, 128),
        help="audit batch sizes, comma-separated (default 1,8,32,64,128)",
    )
    quiet_arg(p)
    p.set_defaults(func=run)
