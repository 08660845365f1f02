"""``knsparse.prune``: score → budget → mask for a whole model, with a per-layer report.

Flow: validate everything (the config, the calibration set, the weights, the layers named) —
any ``ValueError`` is raised before the model is copied or touched — then convert
``nn.MultiheadAttention`` into prunable projections, permute channels (if asked), stream the
calibration statistics the method needs, let the method choose masks in reduction view, write
the pruned weights, and repair (if asked). Marchenko–Pastur fits and the data-path
certificate run only when the method needs them or :class:`~.config.DiagnosticsConfig` asks.

Memory: ``inplace=True`` works on the model itself and keeps one snapshot of its state for the
rollback (the user's model is exactly as it was after any error); ``inplace=False`` deep-copies
the model once and works on the copy. Nothing else holds a whole-model copy: the repair's dense
statistics are taken before masking, and methods read reduction views of the weights.

The certificate of a layer whose removed component is ``R`` (``W - W_new ⊙ mask``):
``B_T(R) = (2/|T|) Σ_s L_s ‖R ψ(s)‖_∞`` over calibration samples (see
:func:`knsparse.pruning.calibration.data_path_budgets`) against the elastic-net decrease
``λ₁(‖W‖₁ - ‖W - R‖₁) + λ₂(‖W‖_F² - ‖W - R‖_F²)``, which for a pure mask equals
``λ₁‖R‖₁ + λ₂‖R‖_F²``. The decrease of the objective ``loss + λ₁‖W‖₁ + λ₂‖W‖_F²`` is
*certified* when the regulariser decrease is at least ``B_T(R)``.
"""

from __future__ import annotations

import copy
import fnmatch
import json
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, replace

import torch
from torch import nn
from tqdm.auto import tqdm

from ..core.checks import check_flag, check_module
from ..core.layers import pattern_layers, reduction_weight
from ..core.masks import check_finite, from_reduction_view
from ..core.pattern import ConvOrder, Pattern, check_conv_order
from ..core.plan import SparsityPlan
from ..integrations import mha
from ..utils.batches import model_batches, model_device
from .calibration import check_calibration, collect_input_stats, data_path_budgets
from .config import (
    CalibrationConfig,
    DenseTarget,
    DiagnosticsConfig,
    MethodConfig,
    PermuteConfig,
    PruneConfig,
    RepairConfig,
)
from .methods import METHODS, Decision, Layer, MethodSpec
from .permutation import PermutationReport
from .permutation.apply import permute_unguarded
from .quantize import QuantizeResult, quantize
from .repair import RepairReport, dense_output_stats, repair_from_stats
from .sensitivity import DenseTargetReport, divergence, keep_dense_to_target, model_logits
from .spectral import MPFit, fit_weights

GRAM_BYTES = 1 << 30
"""Memory bound of the full Gram matrices held at once (float64 ``K²`` per layer): layers are
calibrated a few at a time, one calibration pass per batch of layers."""


@dataclass
class LayerReport:
    """One row of the prune report. ``mp`` and the certificate fields are filled only when the
    method used them or the config's diagnostics asked for them."""

    name: str
    kind: str
    weight_shape: tuple[int, ...]
    rule: str
    target_sparsity: float
    sparsity: float
    mp: MPFit | None = None
    freely_restored: int = 0
    data_path_budget: float | None = None
    """``B_T(R)``; None unless the certificate was asked for."""
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
    """The pruned model, its masks (``{module name: bool mask of its weight}``), the report,
    the layers left dense with the reason, and the config that ran (the recipe)."""

    model: nn.Module
    masks: dict[str, torch.Tensor]
    report: list[LayerReport]
    skipped: dict[str, str]
    config: PruneConfig
    permutation: PermutationReport | None = None
    """Per coupling group kept score before/after and efficacy, when the config permutes."""
    repair: RepairReport | None = None
    """The repair that ran (per-channel γ, λ, batches), when the config repairs."""
    plan: SparsityPlan | None = None
    """The k:n plan (pattern with its conv order, masks, permutation, recipe); ``None`` for
    unstructured masks."""
    converted: list[str] = field(default_factory=list)
    """The ``nn.MultiheadAttention`` modules converted to prunable projections
    (:func:`knsparse.integrations.mha.convert`) in the returned model."""
    dense_target: DenseTargetReport | None = None
    """What ``keep_dense="auto"`` did (per-layer sensitivity, the layers kept dense, agreement and
    KL before/after on the held-out batches, the MAC and sparse-execution shares)."""
    quantization: QuantizeResult | None = None
    """With ``config.quantize``: what :func:`knsparse.quantize` did (the model is fake-quantized)."""

    @property
    def method(self) -> str:
        return self.config.method.name

    @property
    def pattern(self) -> str:
        """The pattern as text (``"2:4"``, ``"2:4/crs"``), or ``"unstructured"``."""
        return "unstructured" if self.config.pattern is None else str(self.config.pattern)

    @property
    def sparsity(self) -> float | None:
        return self.config.sparsity

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
            "converted": self.converted,
            "dense_target": None if self.dense_target is None else self.dense_target.as_dict(),
            "recipe": self.config.to_dict(),
            "quantization": None if self.quantization is None else self.quantization.metadata(),
        }

    def to_json(self) -> str:
        return json.dumps(self.as_dict(), indent=2)

    def table(self) -> str:
        """A plain-text table of the report (MP and certificate columns show ``-`` where they
        were not computed)."""

        def num(x: float | None, fmt: str) -> str:
            return "-" if x is None else format(x, fmt)

        head = (
            f"{'layer':<28} {'rule':<20} {'sparsity':>8} {'spikes':>6} {'bulk':>5} {'KS':>6} "
            f"{'B_T(R)':>9} {'l2|R|^2':>9} {'l1|R|1':>9} {'cert':>5} {'restored':>8}"
        )
        lines = [head, "-" * len(head)]
        for r in self.report:
            cert = "-" if r.certified is None else ("yes" if r.certified else "no")
            mp = (
                ("-", "-", "-")
                if r.mp is None
                else (r.mp.num_spikes, f"{r.mp.bulk_fraction:.2f}", f"{r.mp.fit_error:.3f}")
            )
            lines.append(
                f"{r.name[:28]:<28} {r.rule[:20]:<20} {r.sparsity:>8.4f} {mp[0]:>6} {mp[1]:>5} {mp[2]:>6} "
                f"{num(r.data_path_budget, '9.3g')} {num(r.l2_term, '9.3g')} {num(r.l1_term, '9.3g')} "
                f"{cert:>5} {r.freely_restored:>8}"
            )
        for name, why in self.skipped.items():
            lines.append(f"{name[:28]:<28} skipped: {why}")
        for name, why in self.fallbacks().items():
            lines.append(f"{name[:28]:<28} fallback: {why}")
        lines.append(f"overall sparsity of pruned layers: {self.overall_sparsity():.4f}")
        if self.dense_target is not None:
            lines += ["", self.dense_target.summary(), self.dense_target.table()]
        return "\n".join(lines)


def prune(
    model: nn.Module,
    method: str | PruneConfig,
    pattern: str | Pattern | None = None,
    sparsity: float | None = None,
    calib: Iterable[object] | None = None,
    permute: bool | Mapping[str, object] | PermuteConfig = False,
    repair: str | RepairConfig | None = None,
    inplace: bool = False,
    *,
    conv_order: ConvOrder | None = None,
    progress: bool = True,
    sequential: bool = False,
    diagnostics: DiagnosticsConfig | None = None,
    keep_dense: str | Iterable[str] | DenseTarget = (),
    target_agreement: float | None = None,
    target_kl: float | None = None,
    lam1: float | None = None,
    lam2: float | None = None,
    lipschitz: float | Mapping[str, float] | None = None,
    quantize: str | None = None,
    **options: object,
) -> PruneResult:
    """Prune every prunable layer (Linear, ungrouped Conv2d) of ``model``.

    Two forms: ``prune(model, config, calib=...)`` with a :class:`~.config.PruneConfig` (a
    recipe), or the keywords below, which build one (``result.config``).

    Args:
        model: the model; left untouched unless ``inplace=True``.
        method: a :class:`~.config.PruneConfig`, or a method of
            ``knsparse.pruning.methods.METHODS``: ``magnitude``, ``wanda``, ``sparsegpt``,
            ``sparsegpt-refit``, ``yopo``, ``rmt``, ``ser``, ``hybrid``, ``cast``, ``cast-conv``
            (or one added with :func:`knsparse.register_method`).
        pattern: ``"2:4"``, ``"8:16"``, ``"2:4/crs"``, ...; default ``"2:4"``, or unstructured
            masks when only ``sparsity`` is given (``"unstructured"`` with ``sparsity`` says the same).
        sparsity: target fraction of pruned weights for unstructured masks (parameter-weighted
            over the pruned layers); with ``cast``/``cast-conv`` and a k:n pattern, the sparsity
            of the unstructured pre-mask that free restoration starts from.
        calib: re-iterable of batches: tensors, ``(inputs, target)`` tuples, mappings called as
            ``model(**batch)`` (Hugging Face), or a ``DataLoader`` of those (:mod:`knsparse.utils.batches`);
            required by ``wanda``/``sparsegpt``/``cast``/``cast-conv``, by a repair and by the
            certificate; used by ``ser``/``hybrid`` for data-path scores.
        permute: before scoring, permute channels (function-preserving, see
            :func:`knsparse.pruning.permutation.permute`) so the k:n masks keep more; k:n only.
            ``True``, a :class:`~.config.PermuteConfig` or a dict of its search options
            (``time_budget_s``, ``max_iters``, ``seed``, ``block_stripes``, ``windows``, ``passes``).
        repair: after masking, ``"asr"`` or ``"layerwise"`` (each followed by BatchNorm
            recalibration) or ``"bn"`` (recalibration alone), or a :class:`~.config.RepairConfig`.
        inplace: prune ``model`` itself instead of a deep copy. On any error ``model`` is
            restored exactly as it was (values, module types, training flags).
        conv_order: k:n grouping of conv weights, ``"rsc"`` (TensorRT) or ``"crs"``, for a
            pattern given without one.
        progress: show tqdm progress bars.
        sequential: decide the layers one after the other in forward order, each calibrated on
            the outputs of the already pruned layers before it (``wanda``, ``sparsegpt``,
            ``cast``/``cast-conv`` without ``sparsity``); default: every layer calibrated on the
            dense model (one pass per batch of layers whose full Grams fit ``GRAM_BYTES``).
        diagnostics: a :class:`~.config.DiagnosticsConfig` (MP spectra, the certificate);
            ``lam1``, ``lam2``, ``lipschitz`` given alone ask for the certificate with them.
        keep_dense: layer names or globs never pruned (left dense, with the reason); or
            ``"auto"`` with ``target_agreement`` and/or ``target_kl`` (or a
            :class:`~.config.DenseTarget`): after pruning, layers go back to dense — greedily by
            their KL alone per MAC — until the target holds on held-out calibration batches (every
            4th batch, or the last when there are fewer than 4: those are used for nothing else;
            see :class:`~.config.DenseTarget`). ``result.dense_target`` reports it; the kept
            layers leave the masks, the plan and the report (``result.skipped`` says why). A
            target not reachable with one layer left sparse is a ``ValueError``.
        target_agreement, target_kl: the target of ``keep_dense="auto"`` (top-1 agreement with
            the dense model in (0, 1]; mean ``KL(dense ‖ pruned)`` of the logits, nats).
        quantize: ``"int8"`` / ``"fp8"``: quantize the pruned model on ``calib`` at the end
            (:func:`knsparse.quantize`, activation scales ``"auto"``); ``result.quantization``.
        **options: method options (e.g. ``mode="global"`` for magnitude, ``switch=0.6`` for
            hybrid, ``shrinkage`` for cast/ser/hybrid, ``damp``/``blocksize`` for sparsegpt,
            ``reconstruct`` for cast); unknown names raise ``ValueError``.

    Returns:
        :class:`PruneResult` with the pruned model, ``{layer: bool mask}``, the per-layer report,
        the skipped layers, the config and, for a k:n pattern, the
        :class:`~knsparse.core.plan.SparsityPlan` (``result.plan``) that
        :func:`knsparse.swap_modules`, :func:`knsparse.macs`, :func:`knsparse.audit`,
        :func:`knsparse.finetune` and :func:`knsparse.export_onnx` take.
    """
    check_module(model, meta="refuse")
    check_flag(inplace, "inplace")
    check_flag(progress, "progress")
    if isinstance(method, PruneConfig):
        given = {
            "pattern": pattern is not None,
            "sparsity": sparsity is not None,
            "permute": permute is not False,
            "repair": repair is not None,
            "conv_order": conv_order is not None,
            "sequential": sequential is not False,
            "diagnostics": diagnostics is not None,
            "keep_dense": keep_dense != (),
            "target_agreement/target_kl": target_agreement is not None or target_kl is not None,
            "lam1/lam2/lipschitz": any(v is not None for v in (lam1, lam2, lipschitz)),
            "quantize": quantize is not None,
            **dict.fromkeys(options, True),
        }
        clash = [name for name, set_ in given.items() if set_]
        if clash:
            raise TypeError(
                f"prune(model, config, calib=...) takes what it does from the config; also got {clash} "
                "(pass calib by keyword, and everything else in the PruneConfig)"
            )
        config = method
    else:
        config = _config_from_keywords(
            method, pattern, sparsity, permute, repair, conv_order, sequential, diagnostics,
            _dense_target(keep_dense, target_agreement, target_kl), (lam1, lam2, lipschitz), options,
            quantize,
        )  # fmt: skip
    return _run(model, config, calib, inplace, progress)


def _dense_target(
    keep_dense: object, agreement: float | None, kl: float | None
) -> tuple[str | Iterable[str], DenseTarget | None]:
    """``(keep_dense globs, DenseTarget or None)`` of the keyword form."""
    if isinstance(keep_dense, DenseTarget):
        if agreement is not None or kl is not None:
            raise TypeError("keep_dense=DenseTarget(...) holds the target: drop target_agreement / target_kl")
        return (), keep_dense
    if isinstance(keep_dense, str) and keep_dense == "auto":
        if agreement is None and kl is None:
            raise ValueError("keep_dense='auto' needs target_agreement=<fraction> and/or target_kl=<nats>")
        return (), DenseTarget(agreement=agreement, kl=kl)
    if agreement is not None or kl is not None:
        raise ValueError("target_agreement / target_kl are the target of keep_dense='auto': pass that too")
    return keep_dense, None  # type: ignore[return-value]


def _config_from_keywords(
    method: str,
    pattern: str | Pattern | None,
    sparsity: float | None,
    permute: bool | Mapping[str, object] | PermuteConfig,
    repair: str | RepairConfig | None,
    conv_order: ConvOrder | None,
    sequential: bool,
    diagnostics: DiagnosticsConfig | None,
    keep: tuple[str | Iterable[str], DenseTarget | None],
    certificate: tuple[float | None, float | None, float | Mapping[str, float] | None],
    options: Mapping[str, object],
    quantize: str | None = None,
) -> PruneConfig:
    """The :class:`PruneConfig` the keyword form of :func:`prune` describes."""
    if conv_order is not None:
        check_conv_order(conv_order)
        unstructured = (pattern is None and sparsity is not None) or (
            isinstance(pattern, str) and pattern.strip().lower() == "unstructured"
        )
        if not unstructured:  # unstructured masks do not depend on the grouping
            pattern = Pattern.parse("2:4" if pattern is None else pattern, conv_order)
    if isinstance(permute, Mapping) and not isinstance(permute, PermuteConfig):
        permute = PermuteConfig(dict(permute))
    elif not isinstance(permute, (bool, PermuteConfig)):
        raise TypeError(
            "permute must be True/False, a PermuteConfig or a dict of search options, "
            f"got {type(permute).__name__}"
        )
    check_flag(sequential, "sequential")
    if diagnostics is None:
        diagnostics = DiagnosticsConfig()
    lam1, lam2, lipschitz = certificate
    if any(v is not None for v in certificate):
        defaults = DiagnosticsConfig()
        diagnostics = replace(
            diagnostics,
            certificate=True,
            lam1=defaults.lam1 if lam1 is None else lam1,
            lam2=defaults.lam2 if lam2 is None else lam2,
            lipschitz=defaults.lipschitz if lipschitz is None else lipschitz,
        )
    return PruneConfig(
        MethodConfig(method, dict(options)) if isinstance(method, str) else method,
        pattern if pattern is not None or sparsity is not None else "2:4",
        sparsity,
        permute,
        repair,
        CalibrationConfig(sequential),
        diagnostics,
        tuple(keep[0]) if not isinstance(keep[0], str) else (keep[0],),
        keep[1],
        quantize,
    )


def _run(
    model: nn.Module, config: PruneConfig, calib: Iterable[object] | None, inplace: bool, progress: bool
) -> PruneResult:
    spec = METHODS[config.method.name]
    if calib is None and config.needs_calibration:
        raise ValueError(
            f"prune with method {config.method.name!r}"
            + (f", repair {config.repair.method!r}" if config.repair else "")
            + (", the certificate" if config.diagnostics.certificate else "")
            + (", sequential calibration" if config.calibration.sequential else "")
            + (f", quantize {config.quantize!r}" if config.quantize else "")
            + " needs a calibration set: pass calib=[batch, ...]"
        )
    _check_model(model, config)
    if calib is not None:
        check_calibration(model, calib)
    held = None
    if config.dense_target is not None:
        calib, held = split_holdout(calib, config.dense_target.holdout_every)
    target = model if inplace else copy.deepcopy(model)
    rollback = None
    if inplace:  # a whole snapshot where the model changes before the masks are written
        rollback = _Rollback(
            model, whole=bool(config.permute or config.repair or config.calibration.sequential)
        )
    try:
        result = _prune_in_place(target, config, spec, calib, progress, rollback, held)
    except BaseException:
        if rollback is not None:
            rollback.restore()
        raise
    return result


class _Batches:
    """A re-iterable selection of a calibration set's batches, by their index."""

    def __init__(self, calib: Iterable[object], indices: Iterable[int]) -> None:
        self.calib, self.indices = calib, frozenset(indices)

    def __iter__(self):
        return (b for i, b in enumerate(self.calib) if i in self.indices)


def split_holdout(calib: Iterable[object], every: int) -> tuple[_Batches, _Batches]:
    """``(fit, held)`` views of ``calib``: batches ``every - 1, 2 * every - 1, ...`` held out
    (the last batch when there are fewer than ``every``); ``ValueError`` for fewer than 2."""
    count = sum(1 for _ in model_batches(calib))
    if count < 2:
        raise ValueError(
            f"keep_dense='auto' checks its target on held-out calibration batches: calib has {count} "
            "batch; pass at least 2 (e.g. smaller batches)"
        )
    held = [i for i in range(count) if i % every == every - 1] or [count - 1]
    return _Batches(calib, set(range(count)) - set(held)), _Batches(calib, held)


def _check_model(model: nn.Module, config: PruneConfig) -> None:
    """Everything about ``model`` a config can get wrong, checked before anything changes."""
    layers, _ = pattern_layers(model, config.pattern)
    for name, mod in layers.items():
        check_finite(mod.weight.detach(), f"layer {name!r}")
    for glob in config.keep_dense:
        if not any(fnmatch.fnmatchcase(n, glob) for n in layers) and not _names_mha(model, glob):
            raise ValueError(f"keep_dense: {glob!r} matches no prunable layer of the model")
    lipschitz = config.diagnostics.lipschitz
    if isinstance(lipschitz, Mapping):
        unknown = sorted(set(lipschitz) - set(layers) - set(_mha_projections(model)))
        if unknown:
            raise ValueError(f"lipschitz names unknown layers: {unknown}")


def _mha_projections(model: nn.Module) -> list[str]:
    """The layer names :func:`knsparse.integrations.mha.convert` will create."""
    names = [n for n, m in model.named_modules() if isinstance(m, nn.MultiheadAttention)]
    return [f"{n}.{p}" if n else p for n in names for p in ("q_proj", "k_proj", "v_proj", "out_proj")]


def _names_mha(model: nn.Module, glob: str) -> bool:
    return any(fnmatch.fnmatchcase(n, glob) for n in _mha_projections(model))


class _Rollback:
    """What puts an ``inplace`` prune's model back exactly as it was after an error: the modules
    prune replaces (``nn.MultiheadAttention``), and either one snapshot of the whole state
    (``whole``: a permutation, a repair or sequential calibration change the model early) or an
    undo log kept as the weights are written — the removed values of a mask-only write (half a
    2:4 layer), the whole weight of a write with new values."""

    def __init__(self, model: nn.Module, whole: bool) -> None:
        self.model = model
        self.whole = whole
        self.saved = {k: v.detach().clone() for k, v in model.state_dict().items()} if whole else {}
        self.removed: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
        self.children = [
            (parent, name, child)
            for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, nn.MultiheadAttention)
        ]

    def before_write(self, key: str, weight: torch.Tensor, mask: torch.Tensor, mask_only: bool) -> None:
        """Log state entry ``key`` (``weight``) before it becomes its masked value."""
        if self.whole or key in self.saved or key in self.removed:
            return
        if mask_only:
            self.removed[key] = (mask, weight.detach()[~mask].clone())
        else:
            self.saved[key] = weight.detach().clone()

    def restore(self) -> None:
        for parent, name, child in self.children:
            setattr(parent, name, child)
        state = self.model.state_dict(keep_vars=True)  # converted modules' keys are gone again
        with torch.no_grad():
            for key, value in self.saved.items():
                if key in state:
                    state[key].copy_(value)
            for key, (mask, values) in self.removed.items():
                if key in state:
                    state[key].masked_scatter_(~mask, values)


def _prune_in_place(
    target: nn.Module,
    config: PruneConfig,
    spec: MethodSpec,
    calib: Iterable[object] | None,
    progress: bool,
    rollback: _Rollback | None,
    held: _Batches | None = None,
) -> PruneResult:
    """Prune ``target`` itself by ``config`` (arguments already checked), logging what it
    overwrites into ``rollback`` (``None``: ``target`` is a copy nobody else holds). ``held``:
    the held-out batches of ``keep_dense="auto"`` (``calib`` is then the rest)."""
    converted = mha.convert(target)
    pat, sparsity = config.pattern, config.sparsity
    permutation = None
    if config.permute is not None:
        options = dict(config.permute.options)
        permutation = permute_unguarded(target, pat, calib, options, progress)
    layers, skipped = pattern_layers(target, pat)
    for name in [n for n in layers if any(fnmatch.fnmatchcase(n, g) for g in config.keep_dense)]:
        del layers[name]
        skipped[name] = "kept dense (keep_dense)"
    order: ConvOrder = pat.conv_order if pat is not None else "rsc"
    needs_fit = config.diagnostics.spectra or spec.needs_spectra(sparsity)
    spectra = (
        fit_weights({n: m.weight.detach() for n, m in layers.items()}, progress=progress) if needs_fit else {}
    )
    views = {
        n: Layer(
            n,
            reduction_weight(m, order).float(),
            isinstance(m, nn.Conv2d),
            spectra[n].fit if spectra else None,
        )
        for n, m in layers.items()
    }
    auto = None
    if config.dense_target is not None and layers:  # dense weights and logits before any change
        device = model_device(target)
        fit_batches, held_batches = list(model_batches(calib, device)), list(model_batches(held, device))
        auto = (
            {n: m.weight.detach().clone() for n, m in layers.items()},
            fit_batches,
            held_batches,
            (model_logits(target, fit_batches), model_logits(target, held_batches)),
        )
    dense_stats = {}
    if config.repair is not None and config.repair.method != "bn":
        dense_stats = dense_output_stats(target, list(layers), calib)
    layerwise = spec.layerwise and not (spec.premask and sparsity is not None)
    decisions = _decide(target, layers, views, spec, config, calib, layerwise, progress)
    budgets = {}
    if config.diagnostics.certificate and layers:
        residuals = {n: views[n].weight - _new_values(d, views[n]) for n, d in decisions.items()}
        lipschitz = config.diagnostics.lipschitz
        per_layer = (
            dict(lipschitz) if isinstance(lipschitz, Mapping) else dict.fromkeys(layers, float(lipschitz))
        )
        budgets = data_path_budgets(
            target, layers, calib, residuals, lipschitz=per_layer, conv_order=order, progress=progress
        )
        del residuals
    masks, report = {}, []
    with torch.no_grad():
        for name, d in decisions.items():
            mod, view = layers[name], views[name]
            new = _new_values(d, view)  # before the write: the view may be the weight itself
            report.append(_layer_report(name, mod, d, view, new, budgets.get(name), config.diagnostics))
            shape = mod.weight.shape
            masks[name] = from_reduction_view(d.mask, shape, order)
            if rollback is not None:
                rollback.before_write(f"{name}.weight", mod.weight, masks[name], d.weight is None)
            mod.weight.copy_(from_reduction_view(new, shape, order).to(mod.weight.dtype))
    dense_report = None
    if auto is not None:
        dense_report = _keep_dense_auto(target, layers, masks, report, skipped, config, auto, held, progress)
    repaired = None
    if config.repair is not None:
        rep = config.repair
        repaired = repair_from_stats(
            target, list(masks), dense_stats, calib, rep.method, progress=progress, **rep.options
        )
        if dense_report is not None:
            _, _, held_batches, (_, reference_held) = auto
            dense_report.kl_repaired, dense_report.agreement_repaired = divergence(
                reference_held, model_logits(target, held_batches)
            )
    applied = permutation.applied() if permutation is not None else ()
    plan = None if pat is None else SparsityPlan(pat, masks, applied, config.to_dict())
    quantized = None
    if config.quantize is not None:
        quantized = quantize(target, plan, calib, config.quantize, inplace=True, progress=progress)
    return PruneResult(
        target,
        masks,
        report,
        skipped,
        config,
        permutation,
        repaired,
        plan,
        converted,
        dense_report,
        quantized,
    )


def _keep_dense_auto(
    target: nn.Module,
    layers: Mapping[str, nn.Module],
    masks: dict[str, torch.Tensor],
    report: list[LayerReport],
    skipped: dict[str, str],
    config: PruneConfig,
    auto: tuple,
    held: _Batches,
    progress: bool,
) -> DenseTargetReport:
    """``keep_dense="auto"`` on the freshly pruned ``target``: the layers it keeps dense get their
    dense weights back and leave ``masks`` and ``report`` (``skipped`` says why)."""
    dense, fit_batches, held_batches, reference = auto
    candidates = {n: layers[n] for n in masks}
    pruned = {n: m.weight.detach().clone() for n, m in candidates.items()}
    out = keep_dense_to_target(
        target, candidates, dense, pruned, masks, config.pattern, fit_batches, held_batches, reference,
        config.dense_target, sorted(held.indices), progress,
    )  # fmt: skip
    alone = {r.name: r for r in out.sensitivity}
    for name in out.kept_dense:
        del masks[name]
        skipped[name] = (
            f"kept dense (keep_dense auto: alone it costs KL {alone[name].kl:.4f}, "
            f"agreement {alone[name].agreement:.2%})"
        )
    report[:] = [r for r in report if r.name in masks]
    return out


def _new_values(d: Decision, view: Layer) -> torch.Tensor:
    """The layer's pruned weight in reduction view: the method's new values (or the weight) masked."""
    return (d.weight if d.weight is not None else view.weight) * d.mask


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
    config: PruneConfig,
    calib: Iterable[object] | None,
    layerwise: bool,
    progress: bool,
) -> dict[str, Decision]:
    """Collect calibration statistics and run the method: all layers at once, in memory-bounded
    batches of layers (layer-wise methods with full Grams), or one layer at a time, each
    calibrated on ``target`` with the layers before it already pruned (sequential)."""
    if not layers:
        return {}
    pat, sparsity, options = config.pattern, config.sparsity, config.method.options
    if calib is None or spec.calib == "unused":
        return dict(spec(views, pat, sparsity, **options))
    sequential = config.calibration.sequential
    full_gram = spec.needs_full_gram(options)
    order: ConvOrder = pat.conv_order if pat is not None else "rsc"
    if sequential:
        units = [[n] for n in layers]
    else:
        units = _units(layers, views, full_gram) if layerwise else [list(layers)]
    decisions: dict[str, Decision] = {}
    for unit in tqdm(units, desc="layers", unit="pass", disable=not progress or len(units) == 1):
        stats = collect_input_stats(
            target,
            {n: layers[n] for n in unit},
            calib,
            group=pat.n if spec.group_gram and pat is not None else None,
            full_gram=full_gram,
            conv_order=order,
            progress=progress and len(units) == 1,
            stop_early=len(unit) < len(layers),
        )
        decided = spec({n: replace(views[n], stats=stats[n]) for n in unit}, pat, sparsity, **options)
        decisions.update(decided)
        if sequential:  # the next layer calibrates on this one pruned
            with torch.no_grad():
                for n, d in decided.items():
                    views[n] = replace(views[n], weight=views[n].weight.clone())  # keep the dense view
                    weight = layers[n].weight
                    weight.copy_(
                        from_reduction_view(_new_values(d, views[n]), weight.shape, order).to(weight.dtype)
                    )
    return decisions


def _layer_report(
    name: str,
    mod: nn.Module,
    d: Decision,
    view: Layer,
    new: torch.Tensor,
    budget: float | None,
    diagnostics: DiagnosticsConfig,
) -> LayerReport:
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
        w, r, new64 = view.weight.double(), (view.weight - new).double(), new.double()
        lam1, lam2 = diagnostics.lam1, diagnostics.lam2
        decrease = lam1 * float(w.abs().sum() - new64.abs().sum()) + lam2 * float(
            w.square().sum() - new64.square().sum()
        )
        row.data_path_budget = budget
        row.l2_term = lam2 * float(r.square().sum())
        row.l1_term = lam1 * float(r.abs().sum())
        row.certified = decrease >= budget
    return row
