"""The prune-and-swap steps shared by ``knsparse prune`` and ``knsparse demo``.

:func:`knsparse.pruning.prune.prune` chooses the k:n masks (any method, optionally with channel
permutation before and ASR / BatchNorm repair after), optional masked fine-tuning on the
bundled digits follows (distillation from the dense model with :func:`knsparse.finetune`;
pruned weights stay zero after every optimiser step), then
:func:`knsparse.swap_modules` puts the sparse modules in.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from functools import partial

import torch
from torch import nn

from ..pruning.config import PruneConfig
from ..pruning.finetune import finetune
from ..pruning.prune import PruneResult, prune
from ..pruning.quantize import QuantizeResult, quantize
from ..sparse.densify import dense_copy
from ..sparse.modules import SwapReport, swap_modules
from .data import DigitsSplit, calibration_batches
from .trainer import evaluate

REPAIR_LABEL_WEIGHT = 0.5
"""Weight of the label cross-entropy beside distillation from the dense model in the repair."""


@dataclass
class PruneOutcome:
    """Masks, what the swap did and, with data, accuracies along the way (fractions in [0, 1])."""

    method: str
    pattern: str
    masks: dict[str, torch.Tensor]
    swap: SwapReport
    not_prunable: dict[str, str]
    repair_epochs: int
    prune_result: PruneResult | None = None
    accuracy_dense: float | None = None
    accuracy_pruned: float | None = None
    accuracy_repaired: float | None = None
    accuracy_swapped: float | None = None
    accuracy_quantized: float | None = None
    quantization: QuantizeResult | None = None
    """With ``config.quantize``: the fake-quantized copy of the pruned model (the model itself
    stays float and is swapped to sparse modules)."""

    def describe(self) -> str:
        steps = [f"{self.method} {self.pattern} masks"]
        if self.prune_result is not None and self.prune_result.permutation is not None:
            steps[0] = "channel permutation, " + steps[0]
        if self.prune_result is not None and self.prune_result.repair is not None:
            steps.append(f"{self.prune_result.repair.method} repair")
        if self.repair_epochs:
            steps.append(
                f"{self.repair_epochs} epoch{'s' if self.repair_epochs != 1 else ''} of masked fine-tuning"
            )
        return ", then ".join(steps) + ", swapped to sparse modules"


def prune_and_swap(
    model: nn.Module,
    config: PruneConfig,
    data: DigitsSplit | None = None,
    repair_epochs: int = 0,
    repair_lr: float = 5e-4,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    backend: str = "auto",
    seed: int = 0,
    progress: bool = True,
    calib: object = None,
    evaluator: Callable[[nn.Module], float] | None = None,
) -> PruneOutcome:
    """Prune ``model`` in place and swap its prunable layers to sparse modules.

    Args:
        model: the model (changed in place).
        config: what :func:`knsparse.prune` does (a k:n pattern: the layers are swapped).
        data: the digits split; with it, test accuracy is recorded after every step, its
            training images are the calibration set of the config's method, permutation and
            repair, and ``repair_epochs`` of masked fine-tuning run on them.
        include, exclude: glob patterns over layer names, as in :func:`knsparse.swap_modules`.
        calib, evaluator: without ``data``, the calibration batches (a user's images) and a
            function giving the model's accuracy (top-1 on a user's validation folder).
    """
    if config.pattern is None:
        raise ValueError("prune_and_swap swaps k:n sparse modules in: the config needs a k:n pattern")
    if repair_epochs and data is None:
        raise ValueError("repair by fine-tuning needs the training data")
    if data is not None:
        calib = calibration_batches(data, seed=seed)
        evaluator = partial(_test_accuracy, data=data)
    accuracy_dense = evaluator(model) if evaluator is not None else None
    teacher = copy.deepcopy(model) if repair_epochs else None
    # quantization runs on a dense copy after the swap: the model itself keeps float sparse layers
    result = prune(model, replace(config, quantize=None), calib=calib, inplace=True, progress=progress)
    masks = result.masks
    outcome = PruneOutcome(
        result.method, result.pattern, masks, SwapReport(), result.skipped, repair_epochs, result
    )
    outcome.accuracy_dense = accuracy_dense
    if evaluator is not None:
        outcome.accuracy_pruned = evaluator(model)
    if repair_epochs:
        finetune(
            model,
            teacher,
            (data.x_train, data.y_train),
            repair_epochs,
            plan=result.plan,
            lr=repair_lr,
            label_weight=REPAIR_LABEL_WEIGHT,
            seed=seed,
            progress=progress,
        )
        outcome.accuracy_repaired = evaluator(model)
    outcome.swap = swap_modules(model, result.plan, backend=backend, include=include, exclude=exclude)
    if evaluator is not None:
        outcome.accuracy_swapped = evaluator(model)
    if config.quantize is not None:
        outcome.quantization = quantize(
            dense_copy(model), result.plan, calib, config.quantize, progress=progress
        )
        if evaluator is not None:
            outcome.accuracy_quantized = evaluator(outcome.quantization.model)
    return outcome


def _test_accuracy(model: nn.Module, data: DigitsSplit) -> float:
    return evaluate(model, data.x_test, data.y_test)
