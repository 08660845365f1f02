"""``knsparse finetune``: distil the dense model into a pruned one with its masks held fixed.

The student is a ``knsparse prune`` output (or a state dict with zeros) loaded into ``--model``;
its sparse layers are trained as dense layers holding their masks and swapped back to sparse
modules, with the same pattern, grouping and backend, before rank 0 writes ``--out``. The
teacher is ``--model`` with ``--teacher-weights`` (the built-in digits models: their trained
weights). Data: the bundled digits for the ``*_digits`` models, else ``--data``: a safetensors
file with ``inputs [N, C, H, W]`` and optionally ``labels [N]``, a folder of images (preprocessed
as the model expects; class subfolders give labels), or with ``--augment`` ``--views N``
augmented views of the folder's photos (:class:`knsparse.app.augment.AugmentedViews`, no labels:
distillation alone). Runs on N processes under
``torchrun --nproc-per-node N --no-python knsparse finetune ...`` (see :mod:`knsparse.finetune`).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..app.augment import AugmentedViews
from ..app.data import load_digits_split
from ..app.images import ImageFolder, Preprocess
from ..app.registry import UserError, load_model
from ..core.pattern import Pattern
from ..core.plan import SparsityPlan
from ..pruning.finetune import FinetuneResult, MaskLearning, evaluate, finetune
from ..sparse.densify import dense_copy
from ..sparse.fuse import fuse_activations
from ..sparse.io import save_sparse
from ..sparse.modules import SparseLinear, sparse_layers, swap_modules
from ..utils import distributed
from .args import (
    at_least,
    augment_args,
    check_augment,
    model_args,
    quiet_arg,
    real,
    views_of,
    writable_file,
    writable_folder,
)

TensorData = tuple[torch.Tensor, ...]
DEFAULT_LABEL_WEIGHT = 0.5


def _tensor_file(path: str, flag: str) -> TensorData:
    """``(inputs,)`` or ``(inputs, labels)`` from a safetensors file."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{flag}: no file at {path}")
    tensors = load_file(path)
    if "inputs" not in tensors:
        raise ValueError(
            f"{flag} {path}: needs a tensor named 'inputs' (and optionally 'labels'), has {sorted(tensors)}"
        )
    if "labels" in tensors:
        return tensors["inputs"], tensors["labels"].long()
    return (tensors["inputs"],)


def _image_tensors(path: str, flag: str, preprocess: Preprocess | None) -> TensorData:
    """``(inputs,)`` or ``(inputs, labels)`` (class subfolders) of an image folder, preprocessed."""
    if preprocess is None:
        raise UserError(f"{flag} {path} is an image folder: for models that take images, not the digits")
    folder = ImageFolder.scan(path)
    batches = list(folder.batches(preprocess, 64))
    if folder.labels is None:
        return (torch.cat(batches),)
    return torch.cat([x for x, _ in batches]), torch.cat([y for _, y in batches])


def _data_arg(path: str, flag: str, preprocess: Preprocess | None) -> TensorData:
    """A ``--data`` / ``--val`` value: an image folder or a safetensors file."""
    if Path(path).is_dir():
        return _image_tensors(path, flag, preprocess)
    return _tensor_file(path, flag)


def _data(
    args: argparse.Namespace, digits: bool, preprocess: Preprocess | None
) -> tuple[TensorData | AugmentedViews, TensorData | None, str]:
    """Training data, held-out data (or None) and a description."""
    if args.data is not None:
        val = _data_arg(args.val, "--val", preprocess) if args.val else None
        views = views_of(args, args.data, preprocess)
        train = views if views is not None else _data_arg(args.data, "--data", preprocess)
        described = (
            f"{len(views)} augmented views (seed {args.seed}) of {len(views.paths)} image(s) in {args.data}"
            if views is not None
            else f"{args.data}"
        )
        return train, val, described + (f", val {args.val}" if args.val else "")
    if not digits:
        raise ValueError("--data is needed for a model that is not a *_digits model")
    split = load_digits_split(args.seed)
    return (split.x_train, split.y_train), (split.x_test, split.y_test), "digits (train; accuracy on test)"


def _reswap(model: nn.Module, layers: dict[str, nn.Module], result: FinetuneResult) -> None:
    """Swap the layers that were sparse back, each with its pattern, grouping and backend."""
    by_kind: dict[tuple[Pattern, str], list[str]] = {}
    for name, layer in layers.items():
        by_kind.setdefault((layer.pattern, layer.backend_request), []).append(name)
    for (pattern, backend), names in by_kind.items():
        swap_modules(model, {n: result.masks[n] for n in names}, pattern=pattern, backend=backend)
    if any(isinstance(m, SparseLinear) and m.activation != "none" for m in layers.values()):
        fuse_activations(model)


def _plan(swapped: dict[str, nn.Module], args: argparse.Namespace) -> SparsityPlan | dict | None:
    """The masks of the student's sparse layers: a plan with their one pattern for
    ``--learn-masks`` (which chooses among that pattern's candidates), else a mask dict."""
    masks = {n: layer.mask() for n, layer in swapped.items()}
    if not args.learn_masks:
        return masks or None
    patterns = {layer.pattern for layer in swapped.values()}
    if len(patterns) != 1:
        found = "no sparse layers" if not patterns else f"patterns {sorted(map(str, patterns))}"
        raise UserError(f"--learn-masks needs a 'knsparse prune' output with one k:n pattern; it has {found}")
    return SparsityPlan(patterns.pop(), masks)


def run(args: argparse.Namespace) -> int:
    """The ``finetune`` command; returns the exit status."""
    out = writable_file(args.out)
    if args.checkpoint_dir:
        writable_folder(args.checkpoint_dir, "--checkpoint-dir")
    if args.metrics:
        writable_file(args.metrics, "--metrics")
    if args.resume and not args.checkpoint_dir:
        raise UserError("--resume needs --checkpoint-dir (where the checkpoints are)")
    for given in (args.data, args.val):
        if given is not None and Path(given).is_dir():
            ImageFolder.scan(given)  # a folder without images fails before any work
    check_augment(args, args.data is not None and Path(args.data).is_dir())
    label_weight = args.label_weight
    if args.augment:
        if label_weight:
            raise UserError(
                f"--label-weight {label_weight}: augmented views carry no labels (mixed photos); "
                "--augment distils the teacher alone (--label-weight 0)"
            )
        label_weight = 0.0
    device = distributed.device()
    with distributed.main_first():  # rank 0 trains/caches a built-in teacher once
        loaded = load_model(args.model, args.weights, args.seed)
        teacher = load_model(args.model, args.teacher_weights, args.seed).model
    digits = loaded.input_shape == (1, 8, 8)
    if args.teacher_weights is None and not digits:
        raise UserError(
            "--teacher-weights is needed (the dense model) for a model that is not a *_digits model"
        )
    train, val, described = _data(args, digits, loaded.preprocess)
    if label_weight is None:  # the default: labels where the data has them
        label_weight = DEFAULT_LABEL_WEIGHT if isinstance(train, tuple) and len(train) > 1 else 0.0
    swapped = sparse_layers(loaded.model)
    student = dense_copy(loaded.model) if swapped else loaded.model
    if not any(
        bool((m.weight == 0).any()) for m in student.modules() if isinstance(m, (nn.Linear, nn.Conv2d))
    ):
        raise UserError(f"{args.weights or args.model} has no pruned weights: give a 'knsparse prune' output")
    student, teacher = student.to(device), teacher.to(device).eval()
    before = (
        evaluate(student, torch.utils.data.DataLoader(torch.utils.data.TensorDataset(*val), 256), teacher)
        if val
        else {}
    )
    result = finetune(
        student,
        teacher,
        train,
        args.epochs,
        plan=_plan(swapped, args),
        val=val,
        batch_size=args.batch_size,
        lr=args.lr,
        weight_decay=args.weight_decay,
        warmup=args.warmup,
        temperature=args.temperature,
        label_weight=label_weight,
        grad_clip=args.grad_clip or None,
        amp=args.amp,
        checkpoint_dir=args.checkpoint_dir,
        resume=args.resume,
        metrics_path=args.metrics,
        seed=args.seed,
        progress=not args.quiet,
        learn_masks=MaskLearning(lr=args.mask_lr) if args.learn_masks else False,
        freeze_norm=args.freeze_bn,
    )
    student = student.cpu()
    if swapped:
        _reswap(student, swapped, result)
    if distributed.is_main():
        out.parent.mkdir(parents=True, exist_ok=True)
        if swapped:
            save_sparse(student, out)
        else:
            save_file({k: v.detach().contiguous() for k, v in student.state_dict().items()}, str(out))
        last = result.metrics[-1] if result.metrics else {}
        print(f"{loaded.description}: {args.epochs} epoch(s) of masked distillation on {described}")
        if result.resumed_from:
            print(f"resumed after epoch {result.resumed_from} from {args.checkpoint_dir}")
        for key in ("val_accuracy", "val_agreement"):
            if key in last:
                start = f"{before[key]:.2%} -> " if key in before else ""
                print(f"{key.replace('_', ' ')}: {start}{last[key]:.2%}")
        print(json.dumps(result.metrics[-1] if result.metrics else {}))
        print(f"wrote {out} (load it with: --model {args.model} --weights {out})")
    distributed.barrier()
    return 0


def add_parser(sub: argparse._SubParsersAction) -> None:
    """Register ``finetune`` on the CLI's subparsers."""
    p = sub.add_parser(
        "finetune",
        help="distil the dense model into a pruned one, masks held fixed (DDP under torchrun)",
        description="Knowledge distillation from the dense teacher (KL at temperature T, optional "
        "label cross-entropy) with the k:n masks held fixed; AdamW with warm-up + cosine, gradient "
        "clipping, bf16/fp16 on CUDA, a checkpoint each epoch and --resume. Under "
        "'torchrun --nproc-per-node N --no-python knsparse finetune ...' it runs DistributedDataParallel.",
    )
    model_args(p)
    p.add_argument(
        "--teacher-weights", help="safetensors state dict of the dense teacher (default: built-in)"
    )
    p.add_argument(
        "--data",
        help="safetensors file with 'inputs' [N,C,H,W] and optional 'labels' [N], or a folder of images "
        "(class subfolders give labels) preprocessed as the model expects",
    )
    p.add_argument("--val", help="held-out data in the --data forms (accuracy / agreement per epoch)")
    augment_args(p, "distil")
    p.add_argument("--epochs", type=at_least(1), default=3, help="epochs (default 3)")
    p.add_argument(
        "--batch-size", type=at_least(1), default=64, help="global batch over all processes (default 64)"
    )
    positive = real(low=0, low_open=True)
    p.add_argument("--lr", type=positive, default=5e-4, help="peak learning rate (default 5e-4)")
    p.add_argument("--weight-decay", type=real(low=0), default=0.05, help="AdamW weight decay (default 0.05)")
    p.add_argument(
        "--warmup",
        type=real(low=0, high=1, high_open=True),
        default=0.1,
        help="warm-up fraction of the steps (default 0.1)",
    )
    p.add_argument("--temperature", type=positive, default=2.0, help="distillation temperature (default 2)")
    p.add_argument(
        "--label-weight",
        type=real(low=0, high=1),
        help=f"weight of label cross-entropy (default {DEFAULT_LABEL_WEIGHT} with labelled data, else 0)",
    )
    p.add_argument(
        "--grad-clip", type=real(low=0), default=1.0, help="max gradient norm, 0 for none (default 1)"
    )
    p.add_argument("--amp", choices=("bf16", "fp16"), help="mixed precision on CUDA")
    p.add_argument("--checkpoint-dir", help="write a checkpoint here after every epoch")
    p.add_argument("--resume", action="store_true", help="continue from --checkpoint-dir's latest checkpoint")
    p.add_argument("--metrics", help="write per-epoch metrics as JSON here")
    p.add_argument(
        "--learn-masks",
        action="store_true",
        help="learn the k:n choice of every group during the distillation (MaskLLM-style, from the "
        "pruned masks) instead of holding the masks fixed",
    )
    p.add_argument(
        "--mask-lr",
        type=positive,
        default=MaskLearning.lr,
        help=f"learning rate of the mask logits with --learn-masks (default {MaskLearning.lr})",
    )
    p.add_argument(
        "--freeze-bn",
        action="store_true",
        help="BatchNorm keeps the pretrained running statistics (eval mode; its affine weights "
        "still train): for a few augmented photos",
    )
    p.add_argument("--out", required=True, help="output .safetensors file")
    quiet_arg(p)
    p.set_defaults(func=run, distributed=True)
