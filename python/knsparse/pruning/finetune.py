"""``knsparse.finetune``: masked knowledge distillation from the dense teacher.

The pruned student learns the teacher's softened outputs: ``loss = (1 - α) · T² · KL(p_T ‖ p_S)
+ α · CE(student, labels)`` with ``p = softmax(logits / T)``, averaged over the images of a step.
The k:n masks stay fixed: gradients of pruned entries are zeroed before the optimiser step and
the masks are applied again after it, so pruned weights are exactly zero after every step
(AdamW's decoupled weight decay and its moments never see a nonzero there). With
``learn_masks`` the masks themselves are learned instead (:mod:`knsparse.pruning.learned_masks`):
a differentiable choice among the k:n candidates of every group, initialised from the plan's
masks, written back as hard k:n masks at the end.

Optimiser: AdamW, learning rate warmed up linearly then decayed on a cosine to zero, gradient
norm clipping, bf16/fp16 autocast on CUDA (fp16 with a GradScaler). A checkpoint per epoch
(weights as safetensors, optimiser / schedule / scaler state as a tensors-only ``torch.save``
file read back with ``weights_only=True``) lets a run resume where it stopped.

Under torchrun (see :mod:`knsparse.distributed`) the student is wrapped in
DistributedDataParallel and the data split by a DistributedSampler: each image is seen once per
epoch across the ranks, ``batch_size`` is the global batch (``batch_size / N`` per rank) and the
global batches are the same sets of images as in a one-process run with the same seed, so the
weights after a step agree with one process up to float32 rounding. Rank 0 writes the files.
"""

from __future__ import annotations

import json
import math
import os
import time
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Literal

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset, TensorDataset
from tqdm.auto import tqdm

from ..core.checks import check_choice, check_flag, check_module, check_number, check_path
from ..core.layers import masks_from_zeros
from ..core.masks import apply_masks
from ..core.plan import SparsityPlan, as_plan, plan_masks
from ..utils import distributed
from ..utils.batches import Batch, model_device
from ..utils.modes import evaluation, kept_modes
from ..utils.renamed import renamed
from . import learned_masks

Precision = Literal["bf16", "fp16"]
_AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}
_LABEL_KEYS = ("labels", "label")
LATEST = "latest.json"


@dataclass
class FinetuneResult:
    """The fine-tuned student (trained in place), the masks held fixed and one metrics dict per
    epoch (``loss``, ``kd``, ``ce`` per image; ``lr`` at the end of the epoch; ``seconds``;
    ``images`` seen across ranks; ``val_accuracy`` / ``val_agreement`` in [0, 1] with ``val``)."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    metrics: list[dict[str, float]] = field(default_factory=list)
    resumed_from: int = 0
    """Epochs already done by the checkpoint the run resumed from (0: a fresh run)."""
    plan: SparsityPlan | None = None
    """The plan the student now follows (with ``learn_masks``: the learned masks, the given plan's
    pattern, permutation and recipe); ``None`` when the masks came as a dict, not a plan."""


@dataclass(frozen=True)
class MaskLearning:
    """How :func:`finetune` learns the masks (``learn_masks=MaskLearning(...)``; ``True``: these
    defaults).

    Attributes:
        lr: AdamW peak learning rate of the candidate logits (no weight decay; same schedule).
        temperature: Gumbel-softmax temperature ``(start, end)``, annealed geometrically over
            the run's steps.
        scale: the logits' scale ``κ`` ``(start, end)``, annealed geometrically: a large end scale
            makes the last steps deterministic (the Gumbel noise no longer flips a settled group).
        prior: the one-shot mask's initial logit in every group (the other candidates start at 0).
    """

    lr: float = 0.1  # with prior 3: chosen on the digits validation images (bench/learned_masks.py)
    temperature: tuple[float, float] = (1.0, 0.05)
    scale: tuple[float, float] = (1.0, 100.0)
    prior: float = 3.0

    def __post_init__(self) -> None:
        check_number(self.lr, "MaskLearning.lr", low=0, low_open=True)
        for name in ("temperature", "scale"):
            value = getattr(self, name)
            if not isinstance(value, (tuple, list)) or len(value) != 2:
                raise ValueError(f"MaskLearning.{name} must be (start, end), got {value!r}")
            for t in value:
                check_number(t, f"MaskLearning.{name}", low=0, low_open=True)
            object.__setattr__(self, name, tuple(float(t) for t in value))
        check_number(self.prior, "MaskLearning.prior", low=0)


# ----------------------------------------------------------------------------------- data


def _dataset(data: object, what: str) -> tuple[Dataset, object, int | None]:
    """``(dataset, collate_fn, loader batch size)`` of any accepted data form."""
    if isinstance(data, DataLoader):
        if data.batch_size is None:
            raise TypeError(f"{what}: a DataLoader with a batch_sampler is not supported; give its dataset")
        return data.dataset, data.collate_fn, data.batch_size
    if isinstance(data, torch.Tensor):
        return TensorDataset(data), None, None
    if isinstance(data, tuple) and data and all(isinstance(t, torch.Tensor) for t in data):
        sizes = {len(t) for t in data}
        if len(sizes) != 1:
            raise ValueError(
                f"{what}: tensors of the (inputs, labels) tuple differ in length: {sorted(sizes)}"
            )
        return TensorDataset(*data), None, None
    if hasattr(data, "__getitem__") and hasattr(data, "__len__") and not isinstance(data, (str, bytes)):
        return data, None, None  # type: ignore[return-value]
    raise TypeError(
        f"{what} must be a tensor, an (inputs, labels) tuple of tensors, a map-style Dataset or a "
        f"DataLoader, got {type(data).__name__}"
    )


def _train_loader(data: object, batch_size: int | None, seed: int, num_workers: int) -> DataLoader:
    if isinstance(data, DataLoader) and isinstance(data.sampler, DistributedSampler):
        return data  # already split over the ranks by its owner
    dataset, collate, loader_batch = _dataset(data, "data")
    batch = batch_size or loader_batch or 64
    world = distributed.world_size()
    if batch % world:
        raise ValueError(
            f"batch_size={batch} is the global batch: it must be a multiple of the {world} processes"
        )
    if len(dataset) == 0:
        raise ValueError("data holds no images")
    sampler = DistributedSampler(
        dataset, num_replicas=world, rank=distributed.rank(), shuffle=True, seed=seed
    )
    return DataLoader(
        dataset, batch_size=batch // world, sampler=sampler, collate_fn=collate, num_workers=num_workers
    )


def _val_loader(data: object, batch_size: int) -> DataLoader:
    dataset, collate, _ = _dataset(data, "val")
    mine = Subset(dataset, range(distributed.rank(), len(dataset), distributed.world_size()))
    return DataLoader(mine, batch_size=batch_size, collate_fn=collate)


def _split(batch: object, device: torch.device) -> tuple[object, torch.Tensor | None]:
    """A batch as ``(model inputs, labels or None)``: a tensor, an ``(x, y, ...)`` tuple or a dict
    (``labels``/``label`` taken out, the rest passed as keyword arguments)."""
    if isinstance(batch, torch.Tensor):
        return batch.to(device), None
    if isinstance(batch, Mapping):
        inputs = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
        labels = next((inputs.pop(k) for k in _LABEL_KEYS if k in inputs), None)
        return inputs, labels
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        labels = batch[1].to(device) if len(batch) > 1 and isinstance(batch[1], torch.Tensor) else None
        return batch[0].to(device), labels
    raise TypeError(
        f"a batch must be a tensor, an (inputs, labels) tuple or a dict, got {type(batch).__name__}"
    )


def _logits(model: nn.Module, inputs: object) -> torch.Tensor:
    out = model(**inputs) if isinstance(inputs, Mapping) else model(inputs)
    if isinstance(out, Mapping):
        out = out["logits"]
    elif hasattr(out, "logits"):
        out = out.logits
    elif isinstance(out, (tuple, list)):
        out = out[0]
    return out.reshape(-1, out.shape[-1]).float()


def distillation_loss(student: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """``T² · KL(softmax(teacher/T) ‖ softmax(student/T))`` per row, averaged; logits ``[N, C]``."""
    s = F.log_softmax(student / temperature, dim=-1)
    t = F.log_softmax(teacher / temperature, dim=-1)
    return F.kl_div(s, t, log_target=True, reduction="batchmean") * temperature**2


# ------------------------------------------------------------------------------ schedule


def warmup_cosine(step: int, total: int, warmup: int) -> float:
    """Learning-rate factor: linear from ``1/warmup`` to 1 over ``warmup`` steps, then a cosine to 0."""
    if step < warmup:
        return (step + 1) / warmup
    progress = (step - warmup) / max(total - warmup, 1)
    return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


# ---------------------------------------------------------------------------- checkpoint


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(tmp)
    os.replace(tmp, path)


def _save_checkpoint(
    directory: Path, epoch: int, model: nn.Module, state: dict, metrics: list[dict[str, float]]
) -> None:
    """Rank 0 writes epoch ``epoch``'s files, then ``latest.json`` naming them (written last, so
    it never names a half-written checkpoint)."""
    directory.mkdir(parents=True, exist_ok=True)
    weights, trainer = directory / f"epoch{epoch}.safetensors", directory / f"epoch{epoch}.trainer.pt"
    tensors = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    _write_atomic(weights, lambda p: save_file(tensors, str(p)))
    _write_atomic(trainer, lambda p: torch.save(state, p))
    latest = {"epoch": epoch, "weights": weights.name, "trainer": trainer.name, "metrics": metrics}
    _write_atomic(directory / LATEST, lambda p: p.write_text(json.dumps(latest, indent=2)))


def _write_metrics(path: Path, metrics: list[dict[str, float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    _write_atomic(path, lambda p: p.write_text(json.dumps({"epochs": metrics}, indent=2)))


def _load_checkpoint(directory: Path) -> tuple[int, dict[str, torch.Tensor], dict, list] | None:
    marker = directory / LATEST
    if not marker.is_file():
        return None
    latest = json.loads(marker.read_text())
    weights = load_file(str(directory / latest["weights"]))
    state = torch.load(directory / latest["trainer"], map_location="cpu", weights_only=True)
    return int(latest["epoch"]), weights, state, list(latest["metrics"])


# ---------------------------------------------------------------------------------- train


@torch.no_grad()
def _check_first_batch(what: str, loader: DataLoader, teacher: nn.Module, device: torch.device) -> None:
    """The first batch of ``loader`` split and run through ``teacher`` (eval mode, no change):
    a batch the models cannot take fails here, naming ``what``, before the student changes."""
    try:
        inputs, _ = _split(next(iter(loader)), device)
    except TypeError as exc:
        raise TypeError(f"{what}: {exc}") from None
    call = Batch(kwargs=inputs) if isinstance(inputs, Mapping) else Batch((inputs,))
    with evaluation(teacher):
        replace(call, label=f"{what} batch 0")(teacher)


def _check(student: nn.Module, teacher: nn.Module, args: dict[str, object]) -> torch.device:
    """Every argument of :func:`finetune` (``args``: its keyword values), before anything runs."""
    check_module(student, "student", meta="refuse")
    check_module(teacher, "teacher", meta="refuse")
    if student is teacher:
        raise ValueError("teacher must be a separate (dense) model, not the student itself")
    check_number(args["epochs"], "epochs", low=1, integer=True)
    if args["batch_size"] is not None:
        check_number(args["batch_size"], "batch_size", low=1, integer=True)
    check_number(args["lr"], "lr", low=0, low_open=True)
    check_number(args["weight_decay"], "weight_decay", low=0)
    check_number(args["temperature"], "temperature", low=0, low_open=True)
    check_number(args["label_weight"], "label_weight", low=0, high=1)
    check_number(args["warmup"], "warmup", low=0, high=1, high_open=True)
    if args["grad_clip"] is not None:
        check_number(args["grad_clip"], "grad_clip", low=0, low_open=True)
    check_number(args["seed"], "seed", integer=True)
    check_number(args["num_workers"], "num_workers", low=0, integer=True)
    check_flag(args["resume"], "resume")
    check_flag(args["freeze_norm"], "freeze_norm")
    learn = args["learn_masks"]
    if not isinstance(learn, (bool, MaskLearning)):
        raise TypeError(f"learn_masks must be a bool or a MaskLearning, got {type(learn).__name__}")
    if learn and not isinstance(getattr(args["plan"], "plan", args["plan"]), SparsityPlan):
        raise ValueError(
            "learn_masks needs plan= a SparsityPlan (prune(...).plan): its pattern says which "
            "k:n candidates each group chooses among"
        )
    for name in ("checkpoint_dir", "metrics_path"):
        if args[name] is not None:
            check_path(args[name], name)
    if args["plan"] is not None:
        plan_masks(args["plan"])
    if args["resume"] and args["checkpoint_dir"] is None:
        raise ValueError("resume=True needs checkpoint_dir")
    device = model_device(student)
    if device is None:
        raise ValueError("the student has no parameters to fine-tune")
    if model_device(teacher) != device:
        raise ValueError(
            f"teacher is on {model_device(teacher)}, the student on {device}: put both on one device"
        )
    amp = args["amp"]
    if amp is not None:
        check_choice(amp, "amp", tuple(_AMP_DTYPES))
        if device.type != "cuda":
            raise ValueError(f"mixed precision amp={amp!r} runs on CUDA; the student is on {device}")
    return device


@renamed(masks="plan")
def finetune(
    student: nn.Module,
    teacher: nn.Module,
    data: object,
    epochs: int = 3,
    *,
    plan: SparsityPlan | Mapping[str, torch.Tensor] | None = None,
    val: object = None,
    batch_size: int | None = None,
    lr: float = 5e-4,
    weight_decay: float = 0.05,
    warmup: float = 0.1,
    temperature: float = 2.0,
    label_weight: float = 0.0,
    grad_clip: float | None = 1.0,
    amp: Precision | None = None,
    checkpoint_dir: str | os.PathLike | None = None,
    resume: bool = False,
    metrics_path: str | os.PathLike | None = None,
    seed: int = 0,
    num_workers: int = 0,
    progress: bool = True,
    learn_masks: bool | MaskLearning = False,
    freeze_norm: bool = False,
) -> FinetuneResult:
    """Distil ``teacher`` into the pruned ``student`` (in place) with its masks held fixed
    (or, with ``learn_masks``, learned).

    Args:
        student: the pruned model (dense modules with zeros; swap to sparse modules afterwards).
        teacher: the dense model it was pruned from, on the student's device (only read).
        data: training images: a tensor ``[N, ...]``, an ``(inputs [N, ...], labels [N])`` tuple,
            a map-style Dataset of tensors / tuples / dicts (dict batches run as
            ``model(**batch)``, ``labels`` taken out), or a DataLoader (its dataset, collate
            function and batch size are reused with a seeded DistributedSampler; a loader that
            already has a DistributedSampler is used as it is).
        epochs: total epochs (a resumed run continues up to this count).
        plan: the :class:`~knsparse.core.plan.SparsityPlan` the student was pruned by
            (``prune(...).plan``), or ``{layer name: bool mask of its weight}``; its masks are
            held fixed. Default: the student's zeros in every prunable layer that has some.
        val: optional held-out data in the same forms; its top-1 accuracy (needs labels) and
            top-1 agreement with the teacher are recorded after every epoch.
        batch_size: global images per optimiser step (default: the DataLoader's, else 64).
        lr, weight_decay: AdamW peak learning rate and decoupled weight decay.
        warmup: fraction of all steps with a linear warm-up; a cosine to zero follows.
        temperature: ``T`` of the distillation loss.
        label_weight: ``α``, weight of the label cross-entropy (0: distillation alone).
        grad_clip: max gradient norm (``None``: no clipping).
        amp: ``"bf16"`` or ``"fp16"`` autocast (CUDA only; fp16 adds a GradScaler).
        checkpoint_dir: write ``epoch<N>.safetensors`` + ``epoch<N>.trainer.pt`` + ``latest.json``
            there after every epoch.
        resume: continue from ``checkpoint_dir``'s latest checkpoint (a fresh run if it has none).
        metrics_path: write the per-epoch metrics as JSON there after every epoch.
        seed: seeds the data order (and dropout, per epoch).
        num_workers: DataLoader worker processes.
        progress: tqdm bars (rank 0 only).
        learn_masks: learn the k:n choice of every group of the plan's layers instead of holding
            the masks fixed (``True`` or a :class:`MaskLearning`); needs a
            :class:`~knsparse.core.plan.SparsityPlan` (its pattern) and a teacher with the same
            layer names and shapes (pruned entries restart from the teacher's values, permuted
            as the plan records). The result's ``masks`` and ``plan`` hold the learned masks.
        freeze_norm: BatchNorm layers run in eval mode (their running statistics stay those of
            the pretrained model; their affine weights still train): for a few augmented photos,
            whose batch statistics are not the pretrained data's.

    Returns:
        :class:`FinetuneResult`. Bad arguments raise ``ValueError``/``TypeError`` before the
        student changes.
    """
    arguments = {k: v for k, v in locals().items() if k not in ("student", "teacher")}
    device = _check(student, teacher, arguments)
    held = plan_masks(plan) if plan is not None else masks_from_zeros(student)
    masks = {k: v.to(device, torch.bool) for k, v in held.items()}
    modules = dict(student.named_modules())
    learning = MaskLearning() if learn_masks is True else learn_masks or None
    if learning is not None:
        given = as_plan(plan)
        learned_masks.candidate_masks(given.pattern)
        shapes = {n: modules[n].weight.shape for n in masks if n in modules}
        dense = learned_masks.dense_weights(teacher, sorted(shapes), shapes, given.permutation)
    loader = _train_loader(data, batch_size, seed, num_workers)
    val_loader = _val_loader(val, loader.batch_size or 1) if val is not None else None
    for what, checked in (("data", loader), ("val", val_loader)):
        if checked is not None:
            _check_first_batch(what, checked, teacher, device)
    directory = Path(checkpoint_dir) if checkpoint_dir is not None else None
    loaded = _load_checkpoint(directory) if resume and directory is not None else None
    if loaded is not None and set(loaded[1]) != _state_keys(student, masks if learning else {}):
        raise ValueError(f"the checkpoint in {directory} does not fit the student (other parameter names)")

    apply_masks(student, masks)  # checks every name and shape before it zeroes anything
    soft = learned_masks.attach(student, masks, dense, given.pattern, learning.prior) if learning else {}
    logits = [s.logits for s in soft.values()]
    params = [p for p in student.parameters() if p.requires_grad and not any(p is q for q in logits)]
    groups = [{"params": params}]
    if learning is not None:
        groups.append({"params": logits, "lr": learning.lr, "weight_decay": 0.0})
    opt = torch.optim.AdamW(groups, lr=lr, weight_decay=weight_decay)
    total = epochs * len(loader)
    warm = int(warmup * total)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: warmup_cosine(step, total, warm))
    scaler = torch.amp.GradScaler(device.type, enabled=amp == "fp16")
    metrics: list[dict[str, float]] = []
    start = 0
    if loaded is not None:
        start, weights, state, metrics = loaded
        student.load_state_dict(weights)
        opt.load_state_dict(state["optimizer"])
        sched.load_state_dict(state["scheduler"])
        scaler.load_state_dict(state["scaler"])
    fixed = {} if learning else masks
    apply_masks(student, fixed)
    model = student
    if distributed.active():
        model = DistributedDataParallel(student, device_ids=[device.index] if device.type == "cuda" else None)
    masked = [(modules[n].weight, m.to(modules[n].weight.dtype)) for n, m in fixed.items()]
    schedule = (total, learning.temperature, learning.scale) if learning else None
    trainer = _Trainer(
        model,
        student,
        teacher,
        opt,
        sched,
        scaler,
        masked,
        temperature,
        label_weight,
        grad_clip,
        amp,
        device,
        soft=soft,
        schedule=schedule,
        freeze_norm=freeze_norm,
    )
    try:
        _train(trainer, loader, val_loader, epochs, start, seed, progress, directory, metrics_path, metrics)
    finally:
        if soft:
            masks = learned_masks.finalize(student, soft)
    followed = getattr(plan, "plan", plan)
    followed = followed if isinstance(followed, SparsityPlan) else None
    if learning is not None:
        followed = replace(followed, masks=masks)
    return FinetuneResult(student, masks, metrics, start, followed)


def _state_keys(student: nn.Module, learned: Mapping[str, torch.Tensor]) -> set[str]:
    """The student's state-dict keys once the weights of ``learned`` layers are parametrized
    (what a checkpoint of a mask-learning run holds)."""
    keys = set(student.state_dict())
    for name in learned:
        keys.discard(f"{name}.weight")
        keys |= {f"{name}.parametrizations.weight.original", f"{name}.parametrizations.weight.0.logits"}
    return keys


def _train(
    trainer: _Trainer,
    loader: DataLoader,
    val_loader: DataLoader | None,
    epochs: int,
    start: int,
    seed: int,
    progress: bool,
    directory: Path | None,
    metrics_path: str | os.PathLike | None,
    metrics: list[dict[str, float]],
) -> None:
    """The epochs from ``start``: train, evaluate, write checkpoint and metrics (rank 0)."""
    student, teacher, device, opt = trainer.student, trainer.teacher, trainer.device, trainer.opt
    sched, scaler = trainer.sched, trainer.scaler
    with kept_modes(student), evaluation(teacher):
        for epoch in range(start, epochs):
            torch.manual_seed(seed + epoch)
            loader.sampler.set_epoch(epoch)  # type: ignore[union-attr]
            show = progress and distributed.is_main()
            sums = trainer.epoch(loader, show, f"finetune {epoch + 1}/{epochs}")
            row = _epoch_metrics(epoch + 1, sums, opt)
            if val_loader is not None:
                row.update(evaluate(student, val_loader, teacher, device))
            metrics.append(row)
            if distributed.is_main():
                if directory is not None:
                    state = {
                        "optimizer": opt.state_dict(),
                        "scheduler": sched.state_dict(),
                        "scaler": scaler.state_dict(),
                    }
                    _save_checkpoint(directory, epoch + 1, student, state, metrics)
                if metrics_path is not None:
                    _write_metrics(Path(metrics_path), metrics)
            distributed.barrier()


@dataclass
class _Trainer:
    """What one optimiser step needs (built once per run)."""

    model: nn.Module  # the student, or its DistributedDataParallel wrapper
    student: nn.Module
    teacher: nn.Module
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    scaler: torch.amp.GradScaler
    masked: list[tuple[torch.Tensor, torch.Tensor]]  # (weight, 0/1 mask in its dtype)
    temperature: float
    label_weight: float
    grad_clip: float | None
    amp: str | None
    device: torch.device
    soft: Mapping[str, learned_masks.SoftKN] = field(default_factory=dict)
    freeze_norm: bool = False
    # (total steps, (start, end) temperature, (start, end) logit scale)
    schedule: tuple[int, tuple[float, float], tuple[float, float]] | None = None

    def step(self, batch: object) -> tuple[int, float, float, float | None]:
        """One optimiser step on a batch; returns ``(images, loss, kd, ce or None)``."""
        inputs, labels = _split(batch, self.device)
        if self.schedule is not None:
            total, temperature, scale = self.schedule
            step = self.sched.last_epoch
            learned_masks.set_schedule(
                self.soft,
                learned_masks.annealed(step, total, *temperature),
                learned_masks.annealed(step, total, *scale),
            )
        if self.label_weight > 0 and labels is None:
            raise ValueError(
                "label_weight > 0 needs labels in the data (an (inputs, labels) tuple or 'labels')"
            )
        dtype = _AMP_DTYPES.get(self.amp or "bf16")
        with torch.autocast(self.device.type, dtype=dtype, enabled=self.amp is not None):
            out = _logits(self.model, inputs)
            with torch.no_grad():
                target = _logits(self.teacher, inputs)
        kd = distillation_loss(out, target, self.temperature)
        ce = F.cross_entropy(out, labels.reshape(-1)) if labels is not None else None
        w = self.label_weight
        loss = kd if ce is None or w == 0 else (1 - w) * kd + w * ce
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        for weight, mask in self.masked:
            if weight.grad is not None:
                weight.grad.mul_(mask)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(self.student.parameters(), self.grad_clip)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        with torch.no_grad():
            for weight, mask in self.masked:
                weight.mul_(mask)
        return (
            out.shape[0],
            float(loss.detach()),
            float(kd.detach()),
            None if ce is None else float(ce.detach()),
        )

    def epoch(self, loader: DataLoader, progress: bool, desc: str) -> dict[str, float]:
        """One epoch; its sums over all ranks (loss, kd, ce times images; images; seconds)."""
        sums = {"loss": 0.0, "kd": 0.0, "ce": 0.0, "images": 0.0, "labelled": 0.0}
        begin = time.perf_counter()
        self.model.train()
        if self.freeze_norm:
            for m in self.student.modules():
                if isinstance(m, nn.modules.batchnorm._BatchNorm):
                    m.eval()
        bar = tqdm(loader, desc=desc, unit="batch", disable=not progress, leave=False)
        for batch in bar:
            n, loss, kd, ce = self.step(batch)
            sums["loss"] += loss * n
            sums["kd"] += kd * n
            sums["images"] += n
            if ce is not None:
                sums["ce"] += ce * n
                sums["labelled"] += n
            bar.set_postfix(loss=f"{loss:.4f}")
        sums = distributed.all_reduce_floats(sums)
        sums["seconds"] = time.perf_counter() - begin
        return sums


def _epoch_metrics(epoch: int, sums: Mapping[str, float], opt: torch.optim.Optimizer) -> dict[str, float]:
    images = max(sums["images"], 1.0)
    row = {
        "epoch": epoch,
        "loss": sums["loss"] / images,
        "kd": sums["kd"] / images,
        "lr": opt.param_groups[0]["lr"],
        "seconds": sums["seconds"],
        "images": int(sums["images"]),
        "processes": distributed.world_size(),
    }
    if sums["labelled"]:
        row["ce"] = sums["ce"] / sums["labelled"]
    return row


@torch.no_grad()
def evaluate(
    model: nn.Module, loader: DataLoader, teacher: nn.Module | None = None, device: torch.device | None = None
) -> dict[str, float]:
    """``val_accuracy`` (top-1 against the labels, when the batches carry them) and
    ``val_agreement`` (top-1 equal to the teacher's) over every rank's share of ``loader``."""
    device = device or model_device(model)
    counts = {"images": 0.0, "labelled": 0.0, "correct": 0.0, "agree": 0.0}
    with evaluation(model):
        for batch in loader:
            inputs, labels = _split(batch, device)
            pred = _logits(model, inputs).argmax(-1)
            counts["images"] += pred.numel()
            if labels is not None:
                counts["labelled"] += pred.numel()
                counts["correct"] += float((pred == labels.reshape(-1)).sum())
            if teacher is not None:
                counts["agree"] += float((pred == _logits(teacher, inputs).argmax(-1)).sum())
    counts = distributed.all_reduce_floats(counts)
    out = {}
    if counts["labelled"]:
        out["val_accuracy"] = counts["correct"] / counts["labelled"]
    if teacher is not None and counts["images"]:
        out["val_agreement"] = counts["agree"] / counts["images"]
    return out
