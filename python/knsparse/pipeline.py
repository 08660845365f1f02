"""The prune-and-swap steps shared by ``knsparse prune`` and ``knsparse demo``.

:func:`knsparse.prune.prune` chooses the k:n masks (any method, optionally with channel
permutation before and ASR / BatchNorm repair after), optional masked fine-tuning on the
bundled digits follows (distillation from the dense model with :func:`knsparse.finetune`;
pruned weights stay zero after every optimiser step), then
:func:`knsparse.swap_modules` puts the sparse modules in.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import nn

from .finetune import finetune
from .layers import pattern_layers
from .masks import nm_mask
from .models import DigitsSplit, calibration_batches, evaluate
from .modules import SwapReport, swap_modules
from .pattern import Pattern
from .prune import PruneResult, prune

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


def magnitude_masks(
    model: nn.Module, pattern: str | Pattern
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``{layer: k:n mask keeping the largest |w| per group}`` for every prunable layer, and
    ``{layer: why not}`` for the others (see :func:`knsparse.layers.pattern_layers`)."""
    layers, skipped = pattern_layers(model, pattern)
    masks = {n: nm_mask(m.weight.detach().abs(), pattern, name=n) for n, m in layers.items()}
    return masks, skipped


def prune_and_swap(
    model: nn.Module,
    pattern: str | Pattern = "2:4",
    data: DigitsSplit | None = None,
    repair_epochs: int = 0,
    repair_lr: float = 5e-4,
    method: str = "magnitude",
    permute: bool = False,
    repair: str | None = None,
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    backend: str = "auto",
    seed: int = 0,
    progress: bool = True,
) -> PruneOutcome:
    """Prune ``model`` in place and swap its prunable layers to sparse modules.

    Args:
        model: the model (changed in place).
        pattern: the k:n pattern.
        data: the digits split; with it, test accuracy is recorded after every step, its
            training images are the calibration set of ``method`` / ``permute`` / ``repair``,
            and ``repair_epochs`` of masked fine-tuning run on them.
        method, permute, repair: as in :func:`knsparse.prune.prune` (``"cast"`` and
            ``repair`` need ``data`` for calibration).
        include, exclude: glob patterns over layer names, as in :func:`knsparse.swap_modules`.
    """
    pattern = Pattern.parse(pattern)
    if pattern.is_unstructured:
        raise ValueError("prune needs a k:n pattern such as '2:4'; unstructured masks have no sparse backend")
    if repair_epochs and data is None:
        raise ValueError("repair by fine-tuning needs the training data")
    accuracy_dense = evaluate(model, data.x_test, data.y_test) if data is not None else None
    calib = calibration_batches(data, seed=seed) if data is not None else None
    teacher = copy.deepcopy(model) if repair_epochs else None
    result = prune(
        model, method, pattern, calib=calib, permute=permute, repair=repair, inplace=True, progress=progress
    )
    masks = result.masks
    outcome = PruneOutcome(method, str(pattern), masks, SwapReport(), result.skipped, repair_epochs, result)
    outcome.accuracy_dense = accuracy_dense
    if data is not None:
        outcome.accuracy_pruned = evaluate(model, data.x_test, data.y_test)
    if repair_epochs:
        finetune(
            model,
            teacher,
            (data.x_train, data.y_train),
            repair_epochs,
            masks=masks,
            lr=repair_lr,
            label_weight=REPAIR_LABEL_WEIGHT,
            seed=seed,
            progress=progress,
        )
        outcome.accuracy_repaired = evaluate(model, data.x_test, data.y_test)
    outcome.swap = swap_modules(
        model, masks, pattern=pattern, backend=backend, include=include, exclude=exclude
    )
    if data is not None:
        outcome.accuracy_swapped = evaluate(model, data.x_test, data.y_test)
    return outcome
