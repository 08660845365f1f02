"""The ``knsparse`` command line: ``prune | finetune | inspect | export | audit | demo``.

A thin shell over the library. A mistake on the user's side (a missing file, a bad pattern,
an unknown model or layer) prints one line and exits with status 2, without a traceback
(``KNSPARSE_DEBUG=1`` shows it).

Under ``torchrun --nproc-per-node N --no-python knsparse ...`` ``prune`` and ``finetune`` run on every
process (calibration and training split over them, rank 0 writes and prints); the other
commands run on rank 0 alone.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import NoReturn

import torch

from . import distributed
from .app import commands, finetune_cmd
from .app.commands import at_least
from .app.registry import MODELS_HELP, UserError
from .methods import METHODS
from .pattern import Pattern


class _Parser(argparse.ArgumentParser):
    """argparse, with a mistake reported in one line (``knsparse prune: error: argument ...``)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message}\n")


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


def _pattern(text: str) -> Pattern:
    try:
        return Pattern.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from exc


# -------------------------------------------------------------------------------- parser


def _model_args(p: argparse.ArgumentParser, required: bool = True) -> None:
    p.add_argument("--model", required=required, help=f"the architecture: {MODELS_HELP}")
    p.add_argument(
        "--weights", help="safetensors file to load into it (a 'knsparse prune' output or a state dict)"
    )
    p.add_argument(
        "--seed", type=at_least(0), default=0, help="data split / training / random-weights seed (default 0)"
    )


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="knsparse",
        description="k:n / 2:4 semi-structured sparse inference for vision models: prune, inspect, "
        "export to ONNX/TensorRT and audit dense vs sparse throughput.",
        epilog="Run 'knsparse <command> --help' for the options of each command.",
    )
    sub = parser.add_subparsers(
        dest="command", required=True, metavar="{prune,finetune,inspect,export,audit,demo}"
    )

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
        choices=[name for name, spec in METHODS.items() if spec.accepts(Pattern(2, 4))],
        help="k:n mask method from the registry (those that calibrate use the digits; default magnitude)",
    )
    p.add_argument("--permute", action="store_true", help="permute channels before masking (function kept)")
    p.add_argument(
        "--no-reconstruct",
        action="store_true",
        help="cast/cast-conv: keep CAST's masks without re-fitting the kept weights (the re-fit needs "
        "at least K/8 calibration rows per layer)",
    )
    p.add_argument(
        "--data",
        metavar="DIR",
        help="calibration images: a folder with class subfolders, or a flat folder of images, "
        "preprocessed as the model expects (not for the *_digits models, which use the bundled digits)",
    )
    p.add_argument(
        "--calib-images",
        type=at_least(1),
        default=128,
        help="images drawn from --data (seeded; default 128)",
    )
    p.add_argument("--calib-batch", type=at_least(1), default=16, help="calibration batch size (default 16)")
    p.add_argument(
        "--val",
        metavar="DIR",
        help="a folder with one subfolder per class (sorted names are classes 0, 1, ...): top-1 "
        "before and after pruning",
    )
    p.add_argument(
        "--repair",
        choices=["asr", "layerwise", "bn"],
        help="post-pruning repair on the digits calibration set",
    )
    p.add_argument(
        "--repair-epochs",
        type=at_least(0),
        default=0,
        help="masked fine-tuning epochs on the digits (default 0)",
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
    p.set_defaults(func=commands.prune, distributed=True)

    finetune_cmd.add_parser(sub, _model_args)

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
    p.add_argument(
        "--tome-r", type=at_least(0), default=0, help="count MACs with this many token merges per block"
    )
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.set_defaults(func=commands.inspect)

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
    p.add_argument("--opset", type=at_least(17), default=17, help="ONNX opset, >= 17 (default 17)")
    p.add_argument("--batch", type=at_least(1), default=2, help="batch size of the example input (default 2)")
    p.add_argument("--static-batch", action="store_true", help="fix the batch size instead of a dynamic axis")
    p.add_argument(
        "--no-check", action="store_true", help="skip the ONNX checker and the ONNX Runtime parity run"
    )
    p.add_argument(
        "--dtype",
        choices=tuple(commands.DTYPES),
        default="float32",
        help="weights and compute of the ONNX file: float16/bfloat16 for TensorRT 11's strongly typed "
        "networks (its fp16 sparse kernels need fp16 weights in the file); default float32",
    )
    p.add_argument(
        "--exporter",
        choices=("auto", "torchscript", "dynamo"),
        default="auto",
        help="torch exporter (default auto: TorchScript, then dynamo)",
    )
    p.add_argument(
        "--tome-r", type=at_least(0), default=0, help="export with this many token merges per block (ViT)"
    )
    p.set_defaults(func=commands.export)

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
        "--dtype",
        choices=tuple(commands.DTYPES),
        default="float16",
        help="CUDA compute dtype (default float16)",
    )
    p.add_argument("--backend", default="auto", help="sparse backend: auto or a name from knsparse.backends")
    p.add_argument("--pattern", type=_pattern, default="2:4", help="k:n pattern (default 2:4)")
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=commands.audit)

    p = sub.add_parser(
        "demo",
        help="the main job: train, prune, measure, export, audit; write knsparse-report/",
        description="Train (or reuse) the built-in ViT and ResNet on the bundled digits, prune "
        "them, report accuracy, MACs, ONNX parity and the throughput audit in "
        "knsparse-report/ (markdown, PNG, JSON). With CUDA also audits ViT-B/16 and ResNet-50.",
    )
    p.add_argument("--out", default="knsparse-report", help="report folder (default knsparse-report)")
    p.add_argument("--seed", type=at_least(0), default=0, help="data split and training seed (default 0)")
    p.add_argument("--pattern", type=_pattern, default="2:4", help="k:n pattern (default 2:4)")
    p.add_argument(
        "--batch-sizes",
        type=_batch_sizes,
        default=(1, 8, 32, 64, 128),
        help="audit batch sizes, comma-separated (default 1,8,32,64,128)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=commands.demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    from .backends import BackendUnavailableError
    from .export import ParityError

    args = build_parser().parse_args(argv)
    if distributed.launched() and not getattr(args, "distributed", False):
        if int(os.environ["RANK"]) != 0:
            return 0  # a one-process command: rank 0 runs it alone
    elif distributed.init() and not distributed.is_main():
        args.quiet, sys.stdout = True, open(os.devnull, "w")  # noqa: SIM115 - rank 0 prints
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
    except torch.distributed.DistError as err:  # a rank died or timed out: name it, no hang
        rank = distributed.rank()
        print(f"knsparse {args.command}: rank {rank}: distributed error: {err}", file=sys.stderr)
        return 1
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
