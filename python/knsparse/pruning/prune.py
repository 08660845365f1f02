"""``knsparse.prune``: score → budget → mask for a whole model, with a per-layer report.

Flow: validate everything (method, pattern, options, calibration set, weights) — any
``ValueError`` is raised before the model is copied or touched — then MP-fit every prunable
layer (batched by shape), stream calibration statistics when a calibration set is given, let
the method choose masks in reduction view, compute the per-layer certificate on the calibration
set, and only then write the pruned weights (into a copy unless ``inplace=True``).

The certificate of a layer whose removed component is ``R`` (``W - W_new ⊙ mask``):
``B_T(R) = (2/|T|) Σ_s L_s ‖R ψ(s)‖_∞`` over calibration samples (see
:func:`knsparse.pruning.calibration.data_path_budgets`) against the elastic-net decrease
``λ₁(‖W‖₁ - ‖W - R‖₁) + λ₂(‖W‖_F² - ‖W - R‖_F²)``, which for a pure mask equals
``λ₁‖R‖₁ + λ₂‖R‖_F²``. The decrease of the objective ``loss + λ₁‖W‖₁ + λ₂‖W‖_F²`` is
*certified* when the regulariser decrease is at least ``B_T(R)``.
"""

from __future__ import annotations

import copy
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.checks import check_choice, check_flag, check_module
from ..core.layers import pattern_layers, prunable_layers, reduction_weight
from ..core.masks import ConvOrder, check_finite, from_reduction_view
from ..core.pattern import Pattern
from ..core.plan import SparsityPlan
from .calibration import check_reiterable, collect_input_stats, data_path_budgets
from .methods import METHODS, Decision, Layer, MethodSpec
from .permutation import PermutationReport
from .permutation import permute as permute_channels
from .repair import RepairReport
from .repair import apply as apply_repair
from .spectral import MPFit, fit_weights

REPAIRS = ("asr", "layerwise", "bn")
GRAM_BYTES = 1 << 30
"""Memory bound of the full Gram matrices held at once (float64 ``K²`` per layer): layers are
calibrated a few at a time, one calibration pass per batch of layers."""


@dataclass
class LayerReport:
    """One row of the prune report."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    rule: str
    target_sparsity: float
    sparsity: float
    mp: MPFit
    freely_restored: int = 0
    data_path_budget: float | None = None
    """``B_T(R)``; None without a calibration set."""
    l2_term: float | None = None
    """``λ₂‖R‖_F²``."""
    l1_term: float | None = None
    """``λ₁‖R‖₁``."""
    certified: bool | None = None
    extra: dict[str, float] = field(default_factory=dict)
    fallback: str | None = None
    """Why the method did less than it would on this layer (e.g. calibration too thin for the
    re-fit of the kept weights: the mask rule's weights kept); ``None`` when it ran in full."""

    def as_dict(self) -> dict[str, object]:
        row = asdict(self)
        row["weight_shape"] = list(self.weight_shape)
        return row


@dataclass
class PruneResult:
    """The pruned model, its masks (``{module name: bool mask of its weight}``), the report
    and the layers left dense with the reason."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    report: list[LayerReport]
    skipped: dict[str, str]
    method: str
    pattern: str
    sparsity: float | None
    permutation: PermutationReport | None = None
    """Per coupling group kept score before/after and efficacy, when ``permute=True``."""
    repair: RepairReport | None = None
    """The repair that ran (per-channel γ, λ, batches), when ``repair=...``."""
    plan: SparsityPlan | None = None
    """The k:n plan (pattern, conv order, masks, permutation); ``None`` for unstructured masks."""

    def fallbacks(self) -> dict[str, str]:
        """``{layer: why}`` for the layers on which the method did less than it would."""
        return {r.name: r.fallback for r in self.report if r.fallback is not None}

    def overall_sparsity(self) -> float:
        """Parameter-weighted sparsity over the pruned layers."""
        total = sum(m.numel() for m in self.masks.values())
        pruned = sum(int((~m).sum()) for m in self.masks.values())
        return pruned / total if total else 0.0

    def as_dict(self) -> dict[str, object]:
        return {
            "method": self.method,
            "pattern": self.pattern,
            "sparsity": self.sparsity,
            "overall_sparsity": self.overall_sparsity(),
            "layers": [r.as_dict() for r in self.report],
            "skipped": self.skipped,
            "permuted": self.permutation is not None,
            "repair": None if self.repair is None else self.repair.method,
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table of the report."""

        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        head = (
            f"{'layer':<28} {'rule':<20} {'sparsity':>8} {'spikes':>6} {'bulk':>5} {'KS':>6} "
            f"{'B_T(R)':>9} {'l2|R|^2':>9} {'l1|R|1':>9} {'cert':>5} {'restored':>8}"
        )
        lines = [head, "-" * len(head)]
        for r in self.report:
            cert = "-" if r.certified is None else ("yes" if r.certified else "no")
            lines.append(
                f"{r.name[:28]:<28} {r.rule[:20]:<20} {r.sparsity:>8.4f} {r.mp.num_spikes:>6} "
                f"{r.mp.bulk_fraction:>5.2f} {r.mp.fit_error:>6.3f} {num(r.data_path_budget, '9.3g')} "
                f"{num(r.l2_term, '9.3g')} {num(r.l1_term, '9.3g')} {cert:>5} {r.freely_restored:>8}"
            )
        for name, why in self.skipped.items():
            lines.append(f"{name[:28]:<28} skipped: {why}")
        for name, why in self.fallbacks().items():
            lines.append(f"{name[:28]:<28} fallback: {why}")
        lines.append(f"overall sparsity of pruned layers: {self.overall_sparsity():.4f}")
        return "\n".join(lines)


def _resolve_target(
    method: str, pattern: str | Pattern | None, sparsity: float | None
) -> tuple[Pattern | None, float | None]:
    """The k:n pattern (``None`` for unstructured masks) and sparsity of a call: the one place
    ``prune``'s pattern is parsed."""
    spec = METHODS[method]
    if sparsity is not None:
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)):
            raise TypeError(
                f"sparsity must be a number in [0, 1), got {sparsity!r} ({type(sparsity).__name__})"
            )
        if not 0.0 <= sparsity < 1.0:  # also refuses NaN
            raise ValueError(f"sparsity must be in [0, 1), got {sparsity}")
        sparsity = float(sparsity)
    if isinstance(pattern, str) and pattern.strip().lower() == "unstructured":
        if sparsity is None:
            raise ValueError("an unstructured prune needs sparsity=..., e.g. sparsity=0.5")
        pat = None
    elif pattern is None:
        pat = None if sparsity is not None else Pattern(2, 4)
    else:
        pat = Pattern.parse(pattern)
    if not spec.accepts(pat):
        kind = (
            "a k:n pattern such as '2:4'" if spec.patterns == "kn" else "sparsity=<fraction> and no pattern"
        )
        shown = "unstructured" if pat is None else str(pat)
        raise ValueError(f"method {method!r} does not support {shown} masks; it needs {kind}")
    if pat is not None and sparsity is not None and not spec.premask:
        raise ValueError(
            f"method {method!r} with pattern {pat} fixes the sparsity at {pat.sparsity:g}; "
            "pass either a k:n pattern or sparsity= (only 'cast'/'cast-conv' take both: an unstructured "
            "pre-mask followed by k:n with free restoration)"
        )
    return pat, sparsity


PERMUTE_OPTIONS = ("time_budget_s", "max_iters", "seed")


def _permute_options(
    permute: bool | Mapping[str, object], pattern: Pattern | None
) -> dict[str, object] | None:
    """``None`` for no permutation, else the keyword options of :func:`knsparse.permute`'s search."""
    if isinstance(permute, bool):
        options: dict[str, object] | None = {} if permute else None
    elif isinstance(permute, Mapping):
        unknown = sorted(set(permute) - set(PERMUTE_OPTIONS))
        if unknown:
            raise ValueError(f"unknown permute option(s) {unknown}; it takes {list(PERMUTE_OPTIONS)}")
        options = dict(permute)
    else:
        raise TypeError(
            f"permute must be True/False or a dict of search options {list(PERMUTE_OPTIONS)}, "
            f"got {type(permute).__name__}"
        )
    if options is not None and pattern is None:
        raise ValueError("permute needs a k:n pattern: unstructured masks do not depend on channel order")
    return options


def _check_weights(layers: Mapping[str, nn.Module]) -> None:
    for name, mod in layers.items():
        check_finite(mod.weight.detach(), f"layer {name!r}")


def prune(
    model: nn.Module,
    method: str,
    pattern: str | Pattern | None = None,
    sparsity: float | None = None,
    calib: Iterable[object] | None = None,
    permute: bool | Mapping[str, object] = False,
    repair: str | None = None,
    inplace: bool = False,
    *,
    conv_order: ConvOrder = "rsc",
    lam1: float = 1e-4,
    lam2: float = 1e-4,
    lipschitz: float | Mapping[str, float] = 1.0,
    progress: bool = True,
    sequential: bool = False,
    **options: object,
) -> PruneResult:
    """Prune every prunable layer (Linear, ungrouped Conv2d) of ``model``.

    Args:
        model: the model; left untouched unless ``inplace=True``.
        method: one of ``knsparse.pruning.methods.METHODS``: ``magnitude``, ``wanda``, ``sparsegpt``,
            ``yopo``, ``rmt``, ``ser``, ``hybrid``, ``cast``, ``cast-conv``.
        pattern: ``"2:4"``, ``"8:16"``, ...; default ``"2:4"``, or unstructured masks when only
            ``sparsity`` is given (``"unstructured"`` with ``sparsity`` says the same).
        sparsity: target fraction of pruned weights for unstructured masks (parameter-weighted
            over the pruned layers); with ``cast``/``cast-conv`` and a k:n pattern, the sparsity
            of the unstructured pre-mask that free restoration starts from.
        calib: re-iterable of batches: tensors, ``(inputs, target)`` tuples, mappings called as
            ``model(**batch)`` (Hugging Face), or a ``DataLoader`` of those (:mod:`.batches`);
            required by ``wanda``/``sparsegpt``/``cast``/``cast-conv``, used by ``ser``/``hybrid``
            for data-path scores, and by every method for the certificate in the report.
        permute: before scoring, permute channels (function-preserving, see
            :func:`knsparse.pruning.permutation.permute`) so the k:n masks keep more; k:n patterns only.
            ``True``, or a dict of the search's options to bound it: ``time_budget_s`` (seconds
            per coupling group), ``max_iters``, ``seed``.
        repair: after masking, ``"asr"`` or ``"layerwise"`` (each followed by BatchNorm
            recalibration) or ``"bn"`` (recalibration alone); needs ``calib``.
        inplace: prune ``model`` itself instead of a deep copy. The work still runs on a copy
            whose values are written into ``model`` only when everything succeeded: on any error
            ``model`` is exactly as it was (values, module types, training flags).
        conv_order: k:n grouping of conv weights, ``"rsc"`` (TensorRT) or ``"crs"``.
        lam1, lam2: elastic-net strengths ``λ₁``, ``λ₂`` of the certified objective.
        lipschitz: ``L_s`` of the certificate, one value or ``{layer: value}`` (default 1).
        progress: show tqdm progress bars.
        sequential: decide the layers one after the other in forward order, each calibrated on
            the outputs of the already pruned layers before it (``wanda``, ``sparsegpt``,
            ``cast``/``cast-conv`` without ``sparsity``); default: every layer calibrated on the
            dense model (one pass per batch of layers whose full Grams fit ``GRAM_BYTES``).
        **options: method options (e.g. ``mode="global"`` for magnitude, ``switch=0.6`` for
            hybrid, ``shrinkage`` for cast/ser/hybrid, ``reservoir``, ``damp``/``blocksize`` for
            sparsegpt, ``reconstruct`` for cast); unknown names raise ``ValueError``.

    Returns:
        :class:`PruneResult` with the pruned model, ``{layer: bool mask}``, the per-layer report
        (sparsity, MP fit, certificate, freely restored entries), the skipped layers and, for a
        k:n pattern, the :class:`~knsparse.core.plan.SparsityPlan` (``result.plan``) that
        :func:`knsparse.swap_modules`, :func:`knsparse.macs`, :func:`knsparse.audit` and
        :func:`knsparse.export_onnx` take.
    """
    check_module(model)
    check_choice(method, "method", sorted(METHODS))
    check_flag(inplace, "inplace")
    check_flag(sequential, "sequential")
    spec = METHODS[method]
    pat, sparsity = _resolve_target(method, pattern, sparsity)
    permute_options = _permute_options(permute, pat)
    unknown = set(options) - spec.options
    if unknown:
        raise ValueError(
            f"unknown option(s) {sorted(unknown)} for method {method!r}; it takes {sorted(spec.options)}"
        )
    if calib is None and spec.calib == "required":
        raise ValueError(f"method {method!r} needs a calibration set: pass calib=[batch, ...]")
    if calib is not None:
        check_reiterable(calib)
    layerwise = spec.layerwise and not (spec.premask and sparsity is not None)
    if sequential and (calib is None or not layerwise):
        raise ValueError(
            f"sequential=True needs a calibration set and a method that decides each layer on its own "
            f"(wanda, sparsegpt, cast/cast-conv without sparsity=); got method {method!r}"
        )
    if repair is not None:
        if repair not in REPAIRS:
            raise ValueError(f"unknown repair {repair!r}; choose one of {list(REPAIRS)}")
        if calib is None:
            raise ValueError(f"repair={repair!r} needs a calibration set: pass calib=[batch, ...]")
    if conv_order not in ("rsc", "crs"):
        raise ValueError(f"conv_order must be 'rsc' or 'crs', got {conv_order!r}")
    for label, value in (("lam1", lam1), ("lam2", lam2)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
            raise ValueError(f"{label} must be a number >= 0, got {value!r}")
    found = prunable_layers(model)
    _check_weights(found)
    _check_lipschitz(lipschitz, found)

    # Everything runs on a copy; with inplace=True its state is written back only at the end, so
    # a failure anywhere (a bad calibration batch after the permutation, say) leaves the user's
    # model exactly as it was.
    target = copy.deepcopy(model)
    permutation = None
    if permute_options is not None:
        permutation = permute_channels(
            target, pat, calib, inplace=True, conv_order=conv_order, progress=progress, **permute_options
        )
    dense_twin = copy.deepcopy(target) if repair in ("asr", "layerwise") else None
    layers, skipped = pattern_layers(target, pat, conv_order)
    spectra = fit_weights({n: m.weight.detach() for n, m in layers.items()}, progress=progress)
    views = {
        n: Layer(n, reduction_weight(m, conv_order).float().clone(), isinstance(m, nn.Conv2d), spectra[n].fit)
        for n, m in layers.items()
    }
    mode = (sequential, layerwise)
    args = (pat, sparsity, calib, options, conv_order, mode, progress)
    decisions = _decide(target, layers, views, spec, *args)
    new_values = {
        n: (d.weight if d.weight is not None else views[n].weight) * d.mask for n, d in decisions.items()
    }
    residuals = {n: views[n].weight - new_values[n] for n in decisions}
    budgets: dict[str, float] = {}
    if calib is not None and layers:
        per_layer = lipschitz if isinstance(lipschitz, Mapping) else dict.fromkeys(layers, float(lipschitz))
        budgets = data_path_budgets(
            target, layers, calib, residuals, lipschitz=per_layer, conv_order=conv_order, progress=progress
        )

    masks, report = {}, []
    with torch.no_grad():
        for name, d in decisions.items():
            mod = layers[name]
            shape = mod.weight.shape
            masks[name] = from_reduction_view(d.mask, shape, conv_order)
            mod.weight.copy_(from_reduction_view(new_values[name], shape, conv_order).to(mod.weight.dtype))
            report.append(
                _layer_report(name, mod, d, views[name], new_values[name], budgets.get(name), lam1, lam2)
            )
    repaired = apply_repair(target, dense_twin, calib, repair) if repair is not None else None
    if inplace:
        _write_back(target, model)
        target = model
        if permutation is not None:
            permutation.model = model
    applied = permutation.applied() if permutation is not None else ()
    plan = None if pat is None else SparsityPlan(pat, masks, conv_order, applied)
    shown = "unstructured" if pat is None else str(pat)
    return PruneResult(target, masks, report, skipped, method, shown, sparsity, permutation, repaired, plan)


def _check_lipschitz(lipschitz: float | Mapping[str, float], layers: Mapping[str, nn.Module]) -> None:
    values = lipschitz.values() if isinstance(lipschitz, Mapping) else [lipschitz]
    if isinstance(lipschitz, Mapping) and set(lipschitz) - set(layers):
        raise ValueError(f"lipschitz names unknown layers: {sorted(set(lipschitz) - set(layers))}")
    for v in values:
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
            raise ValueError(f"lipschitz must be a finite number >= 0 (or {{layer: number}}), got {v!r}")


def _write_back(pruned: nn.Module, model: nn.Module) -> None:
    """Copy every parameter and buffer of ``pruned`` (a pruned deep copy of ``model``) into
    ``model`` in place: same tensors, module types and training flags, new values."""
    source = dict(pruned.named_parameters(remove_duplicate=False)) | dict(
        pruned.named_buffers(remove_duplicate=False)
    )
    with torch.no_grad():
        for name, tensor in (
            *model.named_parameters(remove_duplicate=False),
            *model.named_buffers(remove_duplicate=False),
        ):
            tensor.copy_(source[name])


def _units(layers: Mapping[str, nn.Module], views: Mapping[str, Layer], full_gram: bool) -> list[list[str]]:
    """Batches of layer names calibrated in one pass: all at once, or with full Grams as many
    consecutive layers as fit ``GRAM_BYTES``."""
    if not full_gram:
        return [list(layers)]
    units: list[list[str]] = [[]]
    held = 0
    for name in layers:
        size = 8 * views[name].weight.shape[1] ** 2
        if units[-1] and held + size > GRAM_BYTES:
            units.append([])
            held = 0
        units[-1].append(name)
        held += size
    return units


def _decide(
    target: nn.Module,
    layers: Mapping[str, nn.Module],
    views: dict[str, Layer],
    spec: MethodSpec,
    pat: Pattern | None,
    sparsity: float | None,
    calib: Iterable[object] | None,
    options: Mapping[str, object],
    conv_order: ConvOrder,
    mode: tuple[bool, bool],
    progress: bool,
) -> dict[str, Decision]:
    """Collect calibration statistics and run the method: all layers at once, in memory-bounded
    batches of layers (layer-wise methods with full Grams), or one layer at a time on a working
    copy that carries the already pruned layers. ``mode`` is ``(sequential, layerwise)``.
    ``target`` is not changed."""
    sequential, layerwise = mode
    if not layers:
        return {}
    if calib is None or spec.calib == "unused":
        return dict(spec(views, pat, sparsity, **options))
    full_gram = spec.needs_full_gram(options)
    model, mods = target, dict(layers)
    if sequential:
        model = copy.deepcopy(target)
        named = dict(model.named_modules())
        mods = {n: named[n] for n in layers}
        units = [[n] for n in layers]
    else:
        units = _units(layers, views, full_gram) if layerwise else [list(layers)]
    decisions: dict[str, Decision] = {}
    for unit in tqdm(units, desc="layers", unit="pass", disable=not progress or len(units) == 1):
        stats = collect_input_stats(
            model,
            {n: mods[n] for n in unit},
            calib,
            group=pat.n if spec.group_gram and pat is not None else None,
            full_gram=full_gram,
            conv_order=conv_order,
            progress=progress and len(units) == 1,
            stop_early=len(unit) < len(layers),
        )
        decided = spec({n: replace(views[n], stats=stats[n]) for n in unit}, pat, sparsity, **options)
        decisions.update(decided)
        if sequential:
            with torch.no_grad():
                for n, d in decided.items():
                    new = (d.weight if d.weight is not None else views[n].weight) * d.mask
                    weight = mods[n].weight
                    weight.copy_(from_reduction_view(new, weight.shape, conv_order).to(weight.dtype))
    return decisions


def _layer_report(
    name: str,
    mod: nn.Module,
    d: Decision,
    view: Layer,
    new: torch.Tensor,
    budget: float | None,
    lam1: float,
    lam2: float,
) -> LayerReport:
    w, r = view.weight.double(), (view.weight - new).double()
    row = LayerReport(
        name=name,
        kind="conv" if view.is_conv else "linear",
        weight_shape=tuple(mod.weight.shape),
        rule=d.rule,
        target_sparsity=d.target_sparsity,
        sparsity=1.0 - d.mask.float().mean().item(),
        mp=view.fit,
        freely_restored=d.freely_restored,
        extra=dict(d.extra),
        fallback=d.fallback,
    )
    if budget is not None:
        new64 = new.double()
        decrease = lam1 * float(w.abs().sum() - new64.abs().sum()) + lam2 * float(
            w.square().sum() - new64.square().sum()
        )
        row.data_path_budget = budget
        row.l2_term = lam2 * float(r.square().sum())
        row.l1_term = lam1 * float(r.abs().sum())
        row.certified = decrease >= budget
    return row
