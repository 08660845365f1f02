"""``knsparse.quantize``: post-training INT8 / FP8 (e4m3) quantization of a (2:4) pruned model.

Weights: symmetric, one scale per output channel from the *pruned* weight's ``abs().amax()``
(:func:`knsparse.core.quant.quantize_per_channel`): a pruned weight is exactly zero before and
after, so every k:n group of the plan keeps at most k nonzero codes (checked for every layer).
Activations: one symmetric scale per tensor at the input of every quantized Linear/Conv2d, from
the calibration set streamed the way pruning streams it
(:func:`knsparse.pruning.calibration.stream_layer_inputs`: eval mode, no gradients, batch ``i``
on rank ``i mod N`` under torchrun):

- ``"max"``: ``amax = max |x|`` over the calibration inputs (all-reduced by max);
- ``"percentile"``: the ``percentile``-th percentile of ``|x|`` from a histogram of ``bins``
  equal bins over ``[0, amax]`` (a second pass; the counts are all-reduced by sum, so N ranks
  give the histogram of one rank exactly), taken at the upper edge of the bin where the
  cumulative count reaches it (an over-estimate of at most ``amax / bins``);
- ``"auto"``: both, and the one whose fake-quantized model's outputs are closer to the float
  model's on held-out batches (relative squared error ``Σ‖y_q − y‖² / Σ‖y‖²`` over every output
  tensor) is kept. Held out: ``val`` when given; else every 5th calibration batch (indices 4, 9,
  ...) with at least 5 batches, the last one with 2–4, which the statistics then do not see;
  with a single batch the choice is made on it (``result.held_out`` says which).

The layers become :class:`~knsparse.sparse.quantized.QuantLinear` /
:class:`~knsparse.sparse.quantized.QuantConv2d` (fake quantization: quantize → dequantize in
``forward``), which :func:`knsparse.export_onnx` writes as ``QuantizeLinear``/``DequantizeLinear``.
Every argument, the plan against the model and the calibration batches are checked before
anything is computed; the model changes last (a copy unless ``inplace=True``).
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..core.checks import check_choice, check_flag, check_module, check_names, check_number
from ..core.masks import check_finite, is_nm, to_reduction_view
from ..core.plan import SparsityPlan, as_plan
from ..core.quant import QUANT_DTYPES, QuantDType, scale_from_amax
from ..sparse.modules import set_submodule, sparse_layers
from ..sparse.quantized import QuantConv2d, QuantLinear, quant_layers
from ..utils import distributed
from ..utils.batches import model_batches, output_tensors
from ..utils.modes import evaluation
from .calibration import check_calibration, stream_layer_inputs

ACTIVATION_SCALES = ("max", "percentile", "auto")
"""How activation scales are chosen (the one list of them)."""


@dataclass
class QuantizeResult:
    """What :func:`quantize` did.

    Attributes:
        model: the fake-quantized model (the input model itself with ``inplace=True``).
        dtype: ``"int8"`` or ``"fp8"``.
        activation_scale: the rule the activation scales came from, ``"max"`` or
            ``"percentile"`` (``"auto"`` resolved).
        requested: the ``activation_scale`` argument (``"auto"`` included).
        percentile: the percentile used by the percentile rule.
        weight_scales: ``{layer: [out] float32}`` per-output-channel weight scales.
        input_scales: ``{layer: scale}`` per-tensor input scales of the chosen rule.
        input_amax: ``{layer: {"max": amax, "percentile": amax}}``: the input ranges each rule
            measured (``percentile`` absent for ``"max"``).
        output_error: ``{rule: relative squared output error on the held-out batches}`` for
            ``"auto"`` (empty otherwise).
        held_out: which batches ``"auto"`` chose on (``""`` without ``"auto"``).
        plan: the k:n plan the weights were checked against (``None`` for a dense model).
        batches: calibration batches this process streamed per pass.
    """

    model: nn.Module
    dtype: str
    activation_scale: str
    requested: str
    percentile: float
    weight_scales: dict[str, torch.Tensor]
    input_scales: dict[str, float]
    input_amax: dict[str, dict[str, float]]
    output_error: dict[str, float] = field(default_factory=dict)
    held_out: str = ""
    plan: SparsityPlan | None = None
    batches: int = 0

    @property
    def layers(self) -> list[str]:
        """The quantized layers, in model order."""
        return list(self.weight_scales)

    def metadata(self) -> dict[str, Any]:
        """JSON-ready description (what the ONNX metadata records)."""
        return {
            "dtype": self.dtype,
            "weights": "symmetric per output channel (amax of the pruned weight)",
            "activations": "symmetric per tensor",
            "activation_scale": self.activation_scale,
            "requested": self.requested,
            "percentile": self.percentile if self.activation_scale == "percentile" else None,
            "output_error": dict(self.output_error),
            "held_out": self.held_out,
            "layers": self.layers,
        }

    def table(self) -> str:
        """A plain-text table: layer, input scale, input ranges by rule, weight scale range."""
        head = f"{'layer':<32} {'input scale':>11} {'amax max':>9} {'amax pct':>9} {'w scale min..max':>20}"
        lines = [head, "-" * len(head)]
        for name, ws in self.weight_scales.items():
            amax = self.input_amax[name]
            pct = f"{amax['percentile']:9.4g}" if "percentile" in amax else f"{'-':>9}"
            lines.append(
                f"{name[:32]:<32} {self.input_scales[name]:>11.4g} {amax['max']:>9.4g} {pct} "
                f"{float(ws.min()):>9.3g}..{float(ws.max()):<9.3g}"
            )
        if self.output_error:
            errors = ", ".join(f"{k} {v:.3g}" for k, v in self.output_error.items())
            lines.append(f"activation scale: {self.activation_scale} (held-out relative error: {errors})")
        return "\n".join(lines)


class _Subset:
    """The batches of ``calib`` whose index passes ``keep`` (re-iterable, streamed)."""

    def __init__(self, calib: Iterable[object], keep: set[int], invert: bool) -> None:
        self.calib, self.keep, self.invert = calib, keep, invert

    def __iter__(self) -> Iterator[object]:
        for i, batch in enumerate(self.calib):
            if (i in self.keep) != self.invert:
                yield batch


def _split(calib: Iterable[object], val: Iterable[object] | None) -> tuple[Iterable, Iterable, str]:
    """(statistics batches, held-out batches, a description of the held-out set)."""
    if val is not None:
        return calib, val, "val"
    n = sum(1 for _ in calib)
    if n >= 5:
        held = set(range(4, n, 5))
        what = f"every 5th calibration batch ({len(held)} of {n})"
    elif n >= 2:
        held = {n - 1}
        what = f"the last calibration batch (1 of {n})"
    else:
        return calib, calib, "the calibration batch itself (calib has one batch; pass val= to hold data out)"
    return _Subset(calib, held, invert=True), _Subset(calib, held, invert=False), what


def _quantizable(model: nn.Module, exclude: tuple[str, ...]) -> dict[str, nn.Module]:
    layers = {
        n: m
        for n, m in model.named_modules()
        if n and isinstance(m, (nn.Linear, nn.Conv2d)) and getattr(m, "padding_mode", "zeros") == "zeros"
    }
    for glob in exclude:
        if not any(fnmatch.fnmatchcase(n, glob) for n in layers):
            raise ValueError(f"exclude: {glob!r} matches no Linear/Conv2d layer of the model")
    chosen = {n: m for n, m in layers.items() if not any(fnmatch.fnmatchcase(n, g) for g in exclude)}
    for name, mod in model.named_modules():
        if isinstance(mod, nn.MultiheadAttention) and f"{name}.out_proj".lstrip(".") in chosen:
            raise ValueError(
                f"layer {name or 'model'!r} is an nn.MultiheadAttention, whose forward never calls its "
                "out_proj: convert it first (knsparse.integrations.mha.convert(model), as prune does) "
                "or exclude it"
            )
    return chosen


def _check_plan(model: nn.Module, plan: SparsityPlan) -> None:
    """``ValueError`` naming the layer unless every plan layer is a Linear/Conv2d of ``model``
    with the mask's shape and exact zeros at every pruned position."""
    modules = dict(model.named_modules())
    for name, mask in plan.masks.items():
        mod = modules.get(name)
        if not isinstance(mod, (nn.Linear, nn.Conv2d)):
            kind = "no such module" if mod is None else type(mod).__name__
            raise ValueError(f"plan: layer {name!r} is not a Linear/Conv2d of the model ({kind})")
        if tuple(mask.shape) != tuple(mod.weight.shape):
            raise ValueError(
                f"plan: layer {name!r}: mask shape {tuple(mask.shape)} "
                f"!= weight shape {tuple(mod.weight.shape)}"
            )
        live = int((mod.weight.detach()[~mask.to(mod.weight.device)] != 0).sum())
        if live:
            raise ValueError(
                f"plan: layer {name!r} has {live} nonzero weight(s) at pruned positions: the plan does not "
                "match the model (quantize the model prune(...) returned, with its plan)"
            )


def _input_amax(
    model: nn.Module, layers: Mapping[str, nn.Module], calib: Iterable[object], progress: bool
) -> tuple[dict[str, float], int]:
    """``{layer: max |input|}`` over ``calib`` (all-reduced by max), and this rank's batches."""
    local: dict[str, torch.Tensor] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        if not bool(torch.isfinite(x).all()):
            raise ValueError(f"layer {name!r}: calibration inputs contain NaN or Inf")
        m = x.abs().amax().double()
        local[name] = torch.maximum(local[name], m) if name in local else m

    batches = stream_layer_inputs(model, layers, calib, on_input, raw=True, progress=progress, desc="amax")
    reduced = distributed.all_reduce_max(local)
    missing = [n for n in layers if n not in reduced]
    if missing:
        raise ValueError(f"layers never ran during calibration (not on the forward path?): {missing}")
    return {n: float(reduced[n]) for n in layers}, batches


def input_histograms(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable[object],
    amax: Mapping[str, float],
    bins: int,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """``{layer: [bins] float64 counts of |input| over [0, amax[layer]]}`` (all-reduced by sum)."""
    local: dict[str, torch.Tensor] = {}

    def on_input(name: str, x: torch.Tensor) -> None:
        hi = amax[name] if amax[name] > 0 else 1.0
        h = torch.histc(x.abs().flatten(), bins, 0.0, hi).double()
        local[name] = local[name] + h if name in local else h

    stream_layer_inputs(model, layers, calib, on_input, raw=True, progress=progress, desc="histogram")
    return distributed.all_reduce_sum(local)


def percentile_of(counts: torch.Tensor, hi: float, percentile: float) -> float:
    """The upper edge of the bin of a ``[bins]`` histogram over ``[0, hi]`` where the
    cumulative count first reaches ``percentile`` % of the total."""
    total = float(counts.sum())
    if total == 0 or hi <= 0:
        return 0.0
    cdf = counts.cumsum(0) / total
    idx = int(
        torch.searchsorted(cdf, torch.tensor(percentile / 100.0, dtype=cdf.dtype)).clamp(max=len(counts) - 1)
    )
    return min(hi, (idx + 1) * hi / len(counts))


def _output_error(reference: nn.Module, quantized: nn.Module, val: Iterable[object]) -> float:
    """``Σ‖y_q − y‖² / Σ‖y‖²`` over every output tensor of ``val`` (this rank's share, summed
    over the ranks)."""
    num = den = 0.0
    device = next(reference.parameters()).device
    with torch.no_grad(), evaluation(reference), evaluation(quantized):
        for batch in distributed.shard(model_batches(val, device)):
            for y, yq in zip(output_tensors(batch(reference)), output_tensors(batch(quantized)), strict=True):
                num += float((yq.double() - y.double()).square().sum())
                den += float(y.double().square().sum())
    sums = distributed.all_reduce_floats({"num": num, "den": den})
    return sums["num"] / max(sums["den"], 1e-300)


def _quant_module(layer: nn.Module, scale: float, dtype: QuantDType, rule: str) -> nn.Module:
    kind = QuantLinear if isinstance(layer, nn.Linear) else QuantConv2d
    out = kind(layer, scale, dtype)
    out.input_calibration = rule
    return out


def _set_scales(model: nn.Module, scales: Mapping[str, float], rule: str) -> None:
    for name, layer in quant_layers(model).items():
        layer.input_scale.fill_(scales[name])
        layer.input_calibration = rule


def quantize(
    model: nn.Module,
    plan: SparsityPlan | Mapping[str, torch.Tensor] | Any | None,
    calib: Iterable[object],
    dtype: str = "int8",
    activation_scale: str = "auto",
    percentile: float = 99.99,
    *,
    val: Iterable[object] | None = None,
    inplace: bool = False,
    exclude: str | Iterable[str] = (),
    bins: int = 2048,
    progress: bool = False,
) -> QuantizeResult:
    """Quantize every Linear/Conv2d of ``model`` (weights per output channel, inputs per tensor)
    into fake-quantized modules, after checking the plan's masks against the weights.

    Args:
        model: the fp32 model, pruned by ``plan`` (the model :func:`knsparse.prune` returned, not
            swapped: layers must be ``nn.Linear``/``nn.Conv2d``); untouched unless ``inplace``.
        plan: the k:n plan (``prune(...).plan``, a ``PruneResult`` or a ``{layer: mask}`` 2:4
            dict), or ``None`` for a dense model. Every plan layer must hold exact zeros at its
            pruned positions; after quantization every one still follows the plan's pattern.
        calib: re-iterable calibration batches (as for :func:`knsparse.prune`).
        dtype: ``"int8"`` or ``"fp8"`` (float8 e4m3, scale ``amax / 448``).
        activation_scale: ``"max"``, ``"percentile"`` or ``"auto"`` (module docstring).
        percentile: in ``(0, 100]``, the percentile of ``|x|`` the percentile rule keeps.
        val: held-out batches for ``"auto"`` (default: a split of ``calib``, module docstring).
        inplace: swap the layers of ``model`` itself instead of a deep copy (one copy is still
            held while the scales are chosen; its quantized layers then move into ``model``).
        exclude: layer names or globs left in float (e.g. ``"head"``).
        bins: histogram bins of the percentile rule (>= 16).
        progress: tqdm bars for the calibration passes.

    Returns:
        A :class:`QuantizeResult`. ``ValueError``/``TypeError`` naming the argument (``dtype``,
        ``activation_scale``, ``percentile``, ``plan``, ``calib``, ``val``, ``exclude``) before
        anything changes.
    """
    check_module(model)
    check_choice(dtype, "dtype", QUANT_DTYPES)
    check_choice(activation_scale, "activation_scale", ACTIVATION_SCALES)
    percentile = float(check_number(percentile, "percentile", low=0.0, high=100.0, low_open=True))
    check_number(bins, "bins", low=16, integer=True)
    check_flag(inplace, "inplace")
    check_flag(progress, "progress")
    exclude = check_names(exclude, "exclude")
    if quant_layers(model):
        raise ValueError("model is already quantized (it holds QuantLinear/QuantConv2d layers)")
    if sparse_layers(model):
        raise ValueError(
            "model holds swapped SparseLinear/SparseConv2d layers: quantize the pruned dense model "
            "(before swap_modules), or knsparse.sparse.densify.dense_copy(model)"
        )
    if plan is not None:
        try:
            plan = as_plan(plan)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"plan: {exc}") from None
        _check_plan(model, plan)
    layers = _quantizable(model, exclude)
    if not layers:
        raise ValueError("model has no Linear/Conv2d layer to quantize (after exclude)")
    for name, mod in layers.items():
        check_finite(mod.weight.detach(), f"layer {name!r}")
    for arg, data in (("calib", calib), ("val", val)):
        if data is None and arg == "val":
            continue
        try:
            check_calibration(model, data)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"{arg}: {exc}") from None

    stats_calib, held, held_out = (calib, None, "")
    if activation_scale == "auto":
        stats_calib, held, held_out = _split(calib, val)
    amax, batches = _input_amax(model, layers, stats_calib, progress)
    ranges = {n: {"max": a} for n, a in amax.items()}
    if activation_scale != "max":
        hists = input_histograms(model, layers, stats_calib, amax, bins, progress)
        for n in layers:
            ranges[n]["percentile"] = percentile_of(hists[n], amax[n], percentile)
    scales = {
        rule: {n: float(scale_from_amax(torch.tensor(r[rule]), dtype)) for n, r in ranges.items()}
        for rule in ("max", "percentile")
        if all(rule in r for r in ranges.values())
    }

    first = "max" if activation_scale in ("max", "auto") else "percentile"
    quantized = copy.deepcopy(model)
    with torch.no_grad():
        for name in layers:
            layer = quantized.get_submodule(name)
            set_submodule(quantized, name, _quant_module(layer, scales[first][name], dtype, first))
    errors: dict[str, float] = {}
    chosen = first
    if activation_scale == "auto":
        for rule in ("max", "percentile"):
            _set_scales(quantized, scales[rule], rule)
            errors[rule] = _output_error(model, quantized, held)
        chosen = "percentile" if errors["percentile"] < errors["max"] else "max"
        _set_scales(quantized, scales[chosen], chosen)
    _check_kn(quantized, plan)

    if inplace:  # the user's model changes last, one module at a time, nothing left to fail
        for name, layer in quant_layers(quantized).items():
            set_submodule(model, name, layer)
        quantized = model
    qlayers = quant_layers(quantized)
    return QuantizeResult(
        quantized,
        dtype,
        chosen,
        activation_scale,
        percentile,
        {n: qlayers[n].weight_scale.detach().clone() for n in layers},
        dict(scales[chosen]),
        ranges,
        errors,
        held_out,
        plan,
        batches,
    )


def _check_kn(quantized: nn.Module, plan: SparsityPlan | None) -> None:
    """Every plan layer's codes are zero at its pruned positions and follow the pattern."""
    if plan is None:
        return
    qlayers = quant_layers(quantized)
    for name, mask in plan.masks.items():
        if name not in qlayers:
            continue  # excluded: left in float, masked as before
        codes = qlayers[name].weight_q.float()
        nonzero = to_reduction_view(codes, plan.conv_order)
        if bool((codes[~mask.to(codes.device)] != 0).any()) or not is_nm(nonzero, plan.pattern):
            raise RuntimeError(f"layer {name!r}: quantized weight lost the plan's {plan.pattern} pattern")
