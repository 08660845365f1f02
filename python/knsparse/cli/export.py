"""``knsparse export``: ONNX with the parity check, or ``--check FILE`` for TensorRT 2:4."""

from __future__ import annotations

import argparse

import torch

from ..app.registry import UserError, load_model
from ..core.checks import FLOAT_DTYPES
from ..deploy.export import EXPORTERS
from .args import at_least, calibration_args, model_args, quantize_arg, read_calibration, writable_file


def run(args: argparse.Namespace) -> int:
    from ..deploy.export import check, check_markdown, export_onnx

    if args.check:
        if args.model or args.out:
            raise UserError(
                "--check reads an existing ONNX file: give it alone (knsparse export --check FILE)"
            )
        print(check_markdown(check(args.check), weights_only=not args.all_initializers))
        return 0
    if not args.model or not args.out:
        raise UserError("export needs --model and --out (or --check FILE to inspect an ONNX file)")
    from ..deploy import tome

    writable_file(args.out)
    if args.quantize and args.dtype != "float32":
        raise UserError(f"--quantize writes float32 compute around its Q/DQ nodes; drop --dtype {args.dtype}")
    images = _calibration_folder(args)
    loaded = load_model(args.model, args.weights, args.seed)
    if args.tome_r:
        tome.apply(loaded.model, args.tome_r)
    x = torch.randn((args.batch, *loaded.input_shape), generator=torch.Generator().manual_seed(0))
    model, plan = loaded.model, None
    if args.quantize:
        model, plan = _quantized(args, loaded, images)
    result = export_onnx(
        model,
        x,
        args.out,
        opset=args.opset,
        dynamic_batch=not args.static_batch,
        check=not args.no_check,
        exporter=args.exporter,
        dtype=args.dtype,
        plan=plan,
    )
    print(f"wrote {result.path} ({result.exporter} exporter, opset {result.opset})")
    for provider, diff in result.max_abs_diff.items():
        print(
            f"  {provider}: max |ONNX Runtime - PyTorch| = {diff:.3g} "
            f"(batch sizes {result.batch_sizes_checked})"
        )
    if result.quant_parity is not None:
        qp = result.quant_parity
        print(
            f"  Q/DQ ({args.quantize}): fed ONNX Runtime's activation codes, PyTorch's outputs differ by "
            f"{qp['replay_diff']:.3g} (bound {result.tolerance:.3g}); {qp['flips']} of {qp['codes']} codes "
            "rounded one step apart"
        )
    if not args.no_check:
        weights = [c for c in check(result.path) if c.consumer is not None]
        print(
            f"  {sum(c.is_24 for c in weights)} of {len(weights)} weight initializers are 2:4 "
            "on TensorRT's reduction axis "
            f"(details: knsparse export --check {result.path})"
        )
    return 0


def _calibration_folder(args: argparse.Namespace) -> object:
    """``--data`` as an image folder, checked against the model kind before anything loads."""
    from ..app.images import ImageFolder
    from ..app.registry import DIGITS_MODELS

    digits = args.model in DIGITS_MODELS
    if args.data and (digits or not args.quantize):
        why = f"{args.model} calibrates on the bundled digits" if digits else "only --quantize calibrates"
        raise UserError(f"--data is the calibration set of --quantize; {why}")
    if args.quantize and not digits and not args.data:
        raise UserError(
            f"--quantize calibrates its activation scales on images: give --data DIR for {args.model}"
        )
    return ImageFolder.scan(args.data) if args.data else None


def _quantized(args: argparse.Namespace, loaded: object, images: object) -> tuple[object, object]:
    """The fake-quantized model (knsparse.quantize, activation scales "auto") and its k:n plan
    (the one saved with --weights, if any), calibrated on --data or on the bundled digits (the
    same batches as 'knsparse prune' with the same --seed)."""
    from ..app.data import calibration_batches, load_digits_split
    from ..pruning.quantize import quantize
    from ..sparse.densify import dense_copy
    from ..sparse.io import saved_plan

    knsparse_file = args.weights is not None and args.weights.endswith(".safetensors")
    plan = saved_plan(loaded.model, args.weights) if knsparse_file else None
    if images is None:
        calib = calibration_batches(load_digits_split(args.seed), seed=args.seed)
    else:
        calib = read_calibration(images, loaded.preprocess, args, quiet=True)
    q = quantize(dense_copy(loaded.model), plan, calib, args.quantize)
    print(
        f"quantized {q.dtype}: {len(q.layers)} layers, activation scales by {q.activation_scale} "
        f"(held out: {q.held_out})"
    )
    return q.model, plan


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``export`` on the CLI's subparsers."""
    p = sub.add_parser(
        "export",
        help="export to ONNX with parity check, or --check an ONNX file for TensorRT 2:4",
        description="Export a (pruned) model to ONNX: sparse layers become MatMul/Gemm/Conv "
        "with dense initializers holding the zeros; the ONNX checker and ONNX Runtime parity "
        "run unless --no-check. With --check FILE, list every initializer of FILE and "
        "whether it is 2:4 along TensorRT's reduction axis, and why not.",
    )
    model_args(p, required=False)
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
        choices=tuple(FLOAT_DTYPES),
        default="float32",
        help="weights and compute of the ONNX file: float16/bfloat16 for TensorRT 11's strongly typed "
        "networks (its fp16 sparse kernels need fp16 weights in the file); default float32",
    )
    p.add_argument(
        "--exporter",
        choices=EXPORTERS,
        default="auto",
        help="torch exporter (default auto: TorchScript, then dynamo)",
    )
    p.add_argument(
        "--tome-r", type=at_least(0), default=0, help="export with this many token merges per block (ViT)"
    )
    quantize_arg(p)
    calibration_args(p)
    p.set_defaults(func=run)
