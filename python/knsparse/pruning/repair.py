"""Post-pruning repair without fine-tuning: ASR, a layer-wise baseline and BatchNorm recalibration.

Pruning shrinks the variance of a layer's outputs. Adaptive Signal Resuscitation (ASR)
restores it per output channel: from forward passes over a calibration set it measures the
variance ``v_d,i`` of channel ``i`` of a Linear / Conv2d output (before any BatchNorm) in the
dense model and ``v_p,i`` in the pruned one, and rescales the channel by

    γ*_i = sqrt(v_d,i / v_p,i),   s_i = v_p,i / (v_p,i + λ),   γ_i = s_i γ*_i + (1 - s_i),

so channels whose pruned variance is small next to ``λ`` (default: the median of ``v_p``
over the layer's channels) are trusted less and pulled towards ``γ = 1``. A channel with no
variance left gets ``γ = 1``. ``γ`` is folded into the layer's weight rows and bias: the
repaired model costs nothing extra at inference and its zeros (the mask) do not move.

Layers are repaired one at a time in execution order, each measured after the layers before
it were repaired, since those change its input. The layer-wise baseline uses one
``γ = sqrt(Σ v_d / Σ v_p)`` per layer. :func:`recalibrate_bn` re-estimates BatchNorm
running statistics as a cumulative average over the calibration batches.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.checks import check_choice, check_module, check_number
from ..core.layers import is_prunable
from ..utils import distributed
from ..utils.batches import Batch, model_batches, model_device
from ..utils.modes import evaluation

Method = Literal["asr", "layerwise", "bn"]
REPAIRS: tuple[Method, ...] = ("asr", "layerwise", "bn")
"""Repairs after masking: ``asr`` / ``layerwise`` (each followed by BatchNorm recalibration) or
``bn`` (recalibration alone); the one list of them."""


@dataclass
class RepairReport:
    """``gammas`` maps each repaired layer to its per-output-channel scale ``[out]``; ``lam`` to
    the λ used (ASR only); ``batches`` is the number of calibration batches."""

    method: str
    gammas: dict[str, torch.Tensor] = field(default_factory=dict)
    lam: dict[str, float] = field(default_factory=dict)
    batches: int = 0


class _Stop(Exception):
    """Raised by a hook once the layer of interest has been seen: the rest of the forward pass
    is not needed."""


def _channels_first(y: torch.Tensor, module: nn.Module) -> torch.Tensor:
    """Layer output as ``[out, samples]`` (Linear: channels last; Conv2d: ``[N, C, H, W]``)."""
    if isinstance(module, nn.Conv2d):
        return y.transpose(0, 1).reshape(y.shape[1], -1)
    return y.reshape(-1, y.shape[-1]).T


@torch.no_grad()
def _channel_variances(
    model: nn.Module, names: list[str], batches: list[Batch], stop_after: str | None = None
) -> dict[str, torch.Tensor]:
    """Per-output-channel variance (float64 ``[out]``) of the listed layers over all batches,
    and the zero-variance threshold scale (mean square) under key ``name + "/ms"``."""
    stats: dict[str, list[torch.Tensor | int]] = {}
    modules = dict(model.named_modules())

    def hook_for(name: str) -> Callable:
        def hook(module: nn.Module, _inputs: tuple, output: torch.Tensor) -> None:
            y = _channels_first(output.detach(), module).double()
            acc = stats.setdefault(name, [0, 0, 0])
            acc[0] = acc[0] + y.sum(1)
            acc[1] = acc[1] + (y * y).sum(1)
            acc[2] += y.shape[1]
            if name == stop_after:
                raise _Stop

        return hook

    handles = [modules[n].register_forward_hook(hook_for(n)) for n in names]
    try:
        with evaluation(model):
            for batch in batches:
                with contextlib.suppress(_Stop):
                    batch(model)
    finally:
        for h in handles:
            h.remove()
    flat = {
        f"{name}\0{i}": torch.as_tensor(v, dtype=torch.float64)
        for name, acc in stats.items()
        for i, v in enumerate(acc)
    }
    summed = distributed.all_reduce_sum(flat)  # every rank's share of the batches
    out = {}
    for name in dict.fromkeys(key.split("\0")[0] for key in summed):
        total, squares, count = (summed[f"{name}\0{i}"] for i in range(3))
        mean, mean_sq = total / count, squares / count
        out[name] = (mean_sq - mean * mean).clamp_min(0.0)
        out[name + "/ms"] = mean_sq
    return out


def _execution_order(model: nn.Module, names: list[str], batch: Batch) -> list[str]:
    order: list[str] = []
    modules = dict(model.named_modules())
    handles = [
        modules[n].register_forward_hook(lambda m, i, o, n=n: order.append(n) if n not in order else None)
        for n in names
    ]
    try:
        with torch.no_grad(), evaluation(model):
            batch(model)
    finally:
        for h in handles:
            h.remove()
    return order


def pruned_layers(model: nn.Module, dense_model: nn.Module) -> list[str]:
    """Names of the Linear / Conv2d layers of ``model`` with more zero weights than the same
    layer of ``dense_model``. ``ValueError`` when a layer is missing or has another shape."""
    check_module(model, meta="refuse")
    check_module(dense_model, "dense_model", meta="refuse")
    dense = dict(dense_model.named_modules())
    names = []
    for name, m in model.named_modules():
        if not is_prunable(m):
            continue
        d = dense.get(name)
        if not is_prunable(d) or d.weight.shape != m.weight.shape:
            got = (
                "missing"
                if d is None
                else f"{type(d).__name__} {tuple(getattr(d, 'weight', torch.empty(0)).shape)}"
            )
            raise ValueError(
                f"layer {name!r} ({type(m).__name__} {tuple(m.weight.shape)}) "
                f"has no match in dense_model ({got})"
            )
        if int((m.weight == 0).sum()) > int((d.weight == 0).sum()):
            names.append(name)
    return names


def _asr_gamma(
    v_dense: torch.Tensor, v_pruned: torch.Tensor, mean_sq: torch.Tensor, lam: float
) -> torch.Tensor:
    dead = v_pruned <= 1e-12 * mean_sq.clamp_min(1e-300)
    safe = torch.where(dead, torch.ones_like(v_pruned), v_pruned)
    g_star = (v_dense / safe).sqrt()
    denom = safe + lam
    s = torch.where(denom > 0, safe / denom, torch.zeros_like(safe))
    gamma = s * g_star + (1 - s)
    return torch.where(dead, torch.ones_like(gamma), gamma)


@torch.no_grad()
def _fold(module: nn.Module, gamma: torch.Tensor) -> None:
    g = gamma.to(module.weight.dtype).to(module.weight.device)
    module.weight.mul_(g.view(-1, *([1] * (module.weight.dim() - 1))))
    if module.bias is not None:
        module.bias.mul_(g)


GammaRule = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, float | None]]


def dense_output_stats(model: nn.Module, names: list[str], calib: object) -> dict[str, torch.Tensor]:
    """What the repair needs from the dense model, taken before pruning: the per-output-channel
    variance of each listed layer over the calibration set (float64 ``[out]``, every rank's
    share summed). :func:`knsparse.prune` calls it on the model it is about to mask, so no
    dense copy of the model is kept."""
    device = model_device(model)
    local = [x.to(device) for x in distributed.shard(list(model_batches(calib)))]
    return _channel_variances(model, names, local) if names else {}


def _repair(
    model: nn.Module,
    names: list[str],
    dense_stats: dict[str, torch.Tensor],
    calib: object,
    gamma_of: GammaRule,
    method: str,
    progress: bool,
) -> RepairReport:
    device = model_device(model)
    batches = list(model_batches(calib))
    report = RepairReport(method, batches=len(batches))
    if not names:
        return report
    local = [x.to(device) for x in distributed.shard(batches)]  # this rank's share
    modules = dict(model.named_modules())
    order = _execution_order(model, names, batches[0].to(device))
    for name in tqdm(order, desc=method, disable=not progress):
        pruned = _channel_variances(model, [name], local, stop_after=name)
        gamma, lam = gamma_of(dense_stats[name], pruned[name], pruned[name + "/ms"])
        _fold(modules[name], gamma)
        report.gammas[name] = gamma.float()
        if lam is not None:
            report.lam[name] = lam
    return report


def asr(
    model: nn.Module,
    dense_model: nn.Module,
    calib: object,
    shrinkage: Literal["median", "none"] = "median",
    lam: float | None = None,
    *,
    progress: bool = False,
) -> RepairReport:
    """Adaptive Signal Resuscitation of every pruned Linear / Conv2d of ``model`` (in place).

    Args:
        model: the pruned model; its pruned layers are those with more zeros than in
            ``dense_model``, which must have the same layer names, shapes and channel order.
        dense_model: the model before pruning (only read).
        calib: calibration batches (a tensor, a list, a DataLoader; see :mod:`knsparse.utils.batches`).
        shrinkage: ``"median"`` (λ = median of the layer's pruned channel variances) or
            ``"none"`` (λ = 0, γ = γ*).
        lam: a fixed λ for every layer instead (>= 0).
        progress: tqdm bar over the layers.

    Returns a :class:`RepairReport`. Raises ``ValueError`` if ``calib`` yields no batch.
    """
    rule = _asr_rule(shrinkage, lam)
    names = pruned_layers(model, dense_model)  # checks both models first
    return _repair(model, names, dense_output_stats(dense_model, names, calib), calib, rule, "asr", progress)


def _asr_rule(shrinkage: Literal["median", "none"], lam: float | None) -> GammaRule:
    check_choice(shrinkage, "shrinkage", ("median", "none"))
    if lam is not None:
        check_number(lam, "lam", low=0)

    def gamma_of(v_d: torch.Tensor, v_p: torch.Tensor, ms: torch.Tensor) -> tuple[torch.Tensor, float]:
        layer_lam = lam if lam is not None else (float(v_p.median()) if shrinkage == "median" else 0.0)
        return _asr_gamma(v_d, v_p, ms, layer_lam), layer_lam

    return gamma_of


def layerwise(
    model: nn.Module, dense_model: nn.Module, calib: object, *, progress: bool = False
) -> RepairReport:
    """Baseline: one ``γ = sqrt(Σ v_d / Σ v_p)`` per pruned layer (``γ = 1`` if ``Σ v_p = 0``)."""
    names = pruned_layers(model, dense_model)
    stats = dense_output_stats(dense_model, names, calib)
    return _repair(model, names, stats, calib, _layerwise_gamma, "layerwise", progress)


def _layerwise_gamma(v_d: torch.Tensor, v_p: torch.Tensor, ms: torch.Tensor) -> tuple[torch.Tensor, None]:
    total_p, total_d = v_p.sum(), v_d.sum()
    dead = total_p <= 1e-12 * ms.sum().clamp_min(1e-300)
    return torch.ones_like(v_p) * (1.0 if dead else float((total_d / total_p).sqrt())), None


@torch.no_grad()
def recalibrate_bn(model: nn.Module, calib: object, *, progress: bool = False) -> int:
    """Reset every BatchNorm's running statistics and re-estimate them as a cumulative
    average over the calibration batches (other modules stay in eval mode, no gradients).
    Returns the number of batches; ``ValueError`` if there is none."""
    check_module(model, meta="refuse")
    batches = list(model_batches(calib))  # an empty set raises before any change
    device = model_device(model)
    bns = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    saved = [(m.momentum, {k: v.clone() for k, v in m.state_dict().items()}) for m in bns]
    with evaluation(model):
        try:
            for m in bns:
                m.reset_running_stats()
                m.momentum = None  # cumulative moving average
                m.train()
            for batch in tqdm(distributed.shard(batches), desc="recalibrate BN", disable=not progress):
                batch.to(device)(model)
            _all_reduce_bn(bns)
        except BaseException:
            for m, (_, state) in zip(bns, saved, strict=True):
                m.load_state_dict(state)  # a failed batch leaves the statistics as they were
            raise
        finally:
            for m, (momentum, _) in zip(bns, saved, strict=True):
                m.momentum = momentum
    return len(batches)


def _all_reduce_bn(bns: list[nn.Module]) -> None:
    """Combine every rank's cumulative averages into the average over all batches:
    ``Σ_r n_r · avg_r / Σ_r n_r`` with ``n_r`` the batches rank ``r`` ran."""
    if not distributed.active():
        return
    bns = [m for m in bns if m.running_mean is not None]
    flat = {}
    for i, m in enumerate(bns):
        n = m.num_batches_tracked.double()
        flat[f"{i}\0n"] = n.reshape(1)
        flat[f"{i}\0mean"] = m.running_mean.double() * n
        flat[f"{i}\0var"] = m.running_var.double() * n
    summed = distributed.all_reduce_sum(flat)
    for i, m in enumerate(bns):
        n = summed[f"{i}\0n"].clamp_min(1)
        m.running_mean.copy_(summed[f"{i}\0mean"] / n)
        m.running_var.copy_(summed[f"{i}\0var"] / n)
        m.num_batches_tracked.copy_(summed[f"{i}\0n"].reshape(()).long())


def apply(model: nn.Module, dense_model: nn.Module, calib: object, method: Method) -> RepairReport:
    """The repair ``prune(..., repair=method)`` runs: ``"asr"`` or ``"layerwise"`` followed by
    BatchNorm recalibration, or ``"bn"`` (recalibration alone); the pruned layers are those with
    more zeros than in ``dense_model``."""
    check_choice(method, "method", REPAIRS)
    names = [] if method == "bn" else pruned_layers(model, dense_model)
    stats = dense_output_stats(dense_model, names, calib) if names else {}
    return repair_from_stats(model, names, stats, calib, method)


def repair_from_stats(
    model: nn.Module,
    names: list[str],
    dense_stats: dict[str, torch.Tensor],
    calib: object,
    method: Method,
    *,
    shrinkage: Literal["median", "none"] = "median",
    lam: float | None = None,
    progress: bool = False,
) -> RepairReport:
    """The repair ``prune(..., repair=method)`` runs on the layers ``names`` it masked, from the
    statistics :func:`dense_output_stats` took before masking: ``"asr"`` (with its
    ``shrinkage`` / ``lam``) or ``"layerwise"`` followed by BatchNorm recalibration, or ``"bn"``
    (recalibration alone)."""
    check_choice(method, "method", REPAIRS)
    if method == "bn":
        return RepairReport("bn", batches=recalibrate_bn(model, calib))
    rule = _asr_rule(shrinkage, lam) if method == "asr" else _layerwise_gamma
    report = _repair(model, names, dense_stats, calib, rule, method, progress)
    recalibrate_bn(model, calib)
    return report
