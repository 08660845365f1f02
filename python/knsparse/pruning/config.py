"""What :func:`knsparse.prune` does, as small frozen configs: a recipe that can be saved,
shared and replayed exactly.

A :class:`PruneConfig` holds the method and its options, the pattern (with its conv order) or
an unstructured sparsity, the channel permutation's search options, the repair, how the
calibration set is used, the diagnostics to compute, and the layers kept dense. Every config
is validated on construction (a bad field is a ``TypeError``/``ValueError`` naming it) and
records its options *resolved* — defaults filled in from the function that uses them — so
``to_dict()`` says exactly what ran and ``from_dict(to_dict())`` reproduces it::

    config = ks.PruneConfig("sparsegpt-refit", "2:4", permute=ks.PermuteConfig(time_budget_s=2))
    plan = ks.prune(model, config, calib=batches).plan
    config.save("recipe.json")                   # knsparse prune --recipe recipe.json
    assert ks.PruneConfig.load("recipe.json") == config

The plan (:class:`knsparse.core.plan.SparsityPlan`) and the ONNX metadata carry
``config.to_dict()``.
"""

from __future__ import annotations

import inspect
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from types import MappingProxyType
from typing import Any

from ..core.checks import check_choice, check_flag, check_names, check_number, check_path
from ..core.pattern import Pattern
from ..core.quant import QUANT_DTYPES
from . import repair as repair_stage
from .methods import METHODS
from .permutation import permute as permute_channels
from .repair import REPAIRS

RECIPE_VERSION = 1
"""The ``knsparse_recipe`` version :meth:`PruneConfig.to_dict` writes and :meth:`from_dict` reads."""


_JSON_SCALARS = (str, int, float, bool, type(None))


def _json_value(value: object, arg: str) -> object:
    """``value`` if it is JSON-representable (scalars, lists, str-keyed dicts), as lists and
    dicts; else ``TypeError`` naming ``arg``. NaN and infinities are refused (not JSON)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{arg} must be finite, got {value!r}")
    if isinstance(value, _JSON_SCALARS):
        return value
    if isinstance(value, (list, tuple)):
        return [_json_value(v, f"{arg}[{i}]") for i, v in enumerate(value)]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return {k: _json_value(v, f"{arg}[{k!r}]") for k, v in value.items()}
    raise TypeError(f"{arg} must be a JSON value (number, str, bool, list, dict), got {type(value).__name__}")


def _resolved(
    fn: Callable[..., object], given: Mapping[str, object], allowed: frozenset[str], what: str
) -> MappingProxyType:
    """``given`` checked against ``allowed`` (``ValueError`` naming unknown options and the
    known ones), with every other allowed keyword-only option of ``fn`` at its default."""
    if not isinstance(given, Mapping) or not all(isinstance(k, str) for k in given):
        raise TypeError(f"{what} options must be a dict of name: value, got {type(given).__name__}")
    unknown = sorted(set(given) - allowed)
    if unknown:
        raise ValueError(f"unknown option(s) {unknown} for {what}; it takes {sorted(allowed)}")
    params = inspect.signature(fn).parameters
    options = {name: params[name].default for name in sorted(allowed) if name in params}
    options.update({k: _json_value(v, f"{what} option {k!r}") for k, v in given.items()})
    return MappingProxyType(options)


def _strict_keys(data: Mapping[str, Any], known: set[str], where: str) -> None:
    if not isinstance(data, Mapping):
        raise ValueError(f"{where} must be a JSON object, got {type(data).__name__}")
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(f"{where}: unknown field(s) {unknown}; expected some of {sorted(known)}")


@dataclass(frozen=True)
class MethodConfig:
    """A mask method of :data:`knsparse.pruning.methods.METHODS` and its options.

    ``options`` are the method function's keyword-only parameters (e.g. ``mode="global"`` for
    magnitude, ``damp`` for sparsegpt, ``reconstruct`` for cast); unknown names are a
    ``ValueError``. Stored resolved: every option at its value, defaults included.
    """

    name: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.name, "method", sorted(METHODS))
        spec = METHODS[self.name]
        object.__setattr__(
            self, "options", _resolved(spec.fn, self.options, spec.options, f"method {self.name!r}")
        )

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MethodConfig:
        _strict_keys(data, {"name", "options"}, "recipe 'method'")
        return cls(data.get("name"), data.get("options", {}))


_PERMUTE_SKIPPED = frozenset({"model", "pattern", "calib", "inplace", "conv_order", "progress"})
PERMUTE_OPTIONS = frozenset(
    name
    for name, p in inspect.signature(permute_channels).parameters.items()
    if name not in _PERMUTE_SKIPPED and p.kind is inspect.Parameter.KEYWORD_ONLY
)
"""The search options of :func:`knsparse.permute` a recipe can set (all of them)."""


@dataclass(frozen=True)
class PermuteConfig:
    """Channel permutation before masking (:func:`knsparse.permute`), with its search options:
    ``time_budget_s`` (seconds per coupling group), ``max_iters``, ``seed``, ``block_stripes``,
    ``windows``, ``passes``. Stored resolved."""

    options: Mapping[str, Any] = field(default_factory=dict)

    def __init__(self, options: Mapping[str, Any] | None = None, **kwargs: Any) -> None:
        given = {**(options or {}), **kwargs}
        object.__setattr__(self, "options", _resolved(permute_channels, given, PERMUTE_OPTIONS, "permute"))
        _check_permute_options(self.options)

    def to_dict(self) -> dict[str, Any]:
        return dict(self.options)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PermuteConfig:
        _strict_keys(data, set(PERMUTE_OPTIONS), "recipe 'permute'")
        return cls(dict(data))


def _check_permute_options(options: Mapping[str, Any]) -> None:
    """The checks :func:`knsparse.permute` makes, at construction (a bad recipe fails early)."""
    check_number(options["seed"], "permute option 'seed'", integer=True)
    check_number(options["max_iters"], "permute option 'max_iters'", low=0, integer=True)
    check_number(options["block_stripes"], "permute option 'block_stripes'", low=2, integer=True)
    check_number(options["passes"], "permute option 'passes'", low=1, integer=True)
    check_flag(options["windows"], "permute option 'windows'")
    if options["time_budget_s"] is not None:
        check_number(options["time_budget_s"], "permute option 'time_budget_s'", low=0.0)


_ASR_OPTIONS = frozenset({"shrinkage", "lam"})


@dataclass(frozen=True)
class RepairConfig:
    """Repair after masking: ``"asr"`` (with ASR's ``shrinkage`` / ``lam``), ``"layerwise"`` or
    ``"bn"``; the first two are followed by BatchNorm recalibration. Needs a calibration set."""

    method: str
    options: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        check_choice(self.method, "repair", REPAIRS)
        allowed = _ASR_OPTIONS if self.method == "asr" else frozenset()
        resolved = _resolved(repair_stage.asr, self.options, allowed, f"repair {self.method!r}")
        object.__setattr__(self, "options", resolved)

    def to_dict(self) -> dict[str, Any]:
        return {"method": self.method, "options": dict(self.options)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RepairConfig:
        _strict_keys(data, {"method", "options"}, "recipe 'repair'")
        return cls(data.get("method"), data.get("options", {}))


@dataclass(frozen=True)
class CalibrationConfig:
    """How the calibration set is used. ``sequential``: decide the layers one after the other
    in forward order, each calibrated on the outputs of the already pruned layers (methods
    that decide each layer on its own: wanda, sparsegpt, cast/cast-conv without sparsity);
    default: every layer calibrated on the dense model."""

    sequential: bool = False

    def __post_init__(self) -> None:
        check_flag(self.sequential, "calibration.sequential")

    def to_dict(self) -> dict[str, Any]:
        return {"sequential": self.sequential}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> CalibrationConfig:
        _strict_keys(data, {"sequential"}, "recipe 'calibration'")
        return cls(**data)


@dataclass(frozen=True)
class DiagnosticsConfig:
    """Research diagnostics, computed only when asked (they cost time, not quality):

    * ``spectra``: a Marchenko–Pastur fit of every pruned layer's weight in the report (the
      methods that need one — rmt, ser, hybrid, cast with an unstructured pre-mask — fit it
      anyway);
    * ``certificate``: the data-path certificate of every layer on the calibration set (a
      second calibration pass): ``B_T(R)`` against the elastic-net decrease with strengths
      ``lam1``, ``lam2`` and Lipschitz constants ``lipschitz`` (one number, or ``{layer: L}``).
    """

    spectra: bool = False
    certificate: bool = False
    lam1: float = 1e-4
    lam2: float = 1e-4
    lipschitz: float | Mapping[str, float] = 1.0

    def __post_init__(self) -> None:
        check_flag(self.spectra, "diagnostics.spectra")
        check_flag(self.certificate, "diagnostics.certificate")
        check_number(self.lam1, "lam1", low=0.0)
        check_number(self.lam2, "lam2", low=0.0)
        values = self.lipschitz.values() if isinstance(self.lipschitz, Mapping) else [self.lipschitz]
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < math.inf:
                raise ValueError(f"lipschitz must be a finite number >= 0 (or {{layer: number}}), got {v!r}")
        if isinstance(self.lipschitz, Mapping):
            object.__setattr__(self, "lipschitz", MappingProxyType(dict(self.lipschitz)))

    def to_dict(self) -> dict[str, Any]:
        lipschitz = dict(self.lipschitz) if isinstance(self.lipschitz, Mapping) else self.lipschitz
        return {
            "spectra": self.spectra,
            "certificate": self.certificate,
            "lam1": self.lam1,
            "lam2": self.lam2,
            "lipschitz": lipschitz,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DiagnosticsConfig:
        _strict_keys(data, {f.name for f in fields(cls)}, "recipe 'diagnostics'")
        return cls(**data)


@dataclass(frozen=True)
class DenseTarget:
    """``keep_dense="auto"``: after pruning, layers go back to dense, the most harmful per MAC
    first, until the pruned model meets the target on held-out calibration batches.

    Attributes:
        agreement: top-1 agreement with the dense model to reach, in (0, 1].
        kl: mean ``KL(dense ‖ pruned)`` of the final logits (nats per image) to stay within, >= 0.
            At least one of the two; with both, both must hold.
        holdout_every: every ``holdout_every``-th calibration batch (indices ``holdout_every - 1``,
            ``2 * holdout_every - 1``, ...; the last batch when there are fewer) is held out:
            the target is checked on those, everything else (masks, repair, the per-layer
            sensitivity) uses the others. Needs >= 2 calibration batches.
        max_dense: at most this many layers go back to dense (``None``: any number, but at least
            one layer stays sparse); a target not reached within it is a ``ValueError``.
    """

    agreement: float | None = None
    kl: float | None = None
    holdout_every: int = 4
    max_dense: int | None = None

    def __post_init__(self) -> None:
        if self.agreement is None and self.kl is None:
            raise ValueError("keep_dense='auto' needs a target: agreement=<fraction> and/or kl=<nats>")
        if self.agreement is not None:
            check_number(self.agreement, "target agreement", low=0, high=1, low_open=True)
        if self.kl is not None:
            check_number(self.kl, "target kl", low=0)
        check_number(self.holdout_every, "holdout_every", low=2, integer=True)
        if self.max_dense is not None:
            check_number(self.max_dense, "max_dense", low=0, integer=True)

    def met(self, agreement: float, kl: float) -> bool:
        """Whether measured ``agreement`` and ``kl`` meet the target."""
        return (self.agreement is None or agreement >= self.agreement) and (self.kl is None or kl <= self.kl)

    def describe(self) -> str:
        parts = [f"agreement >= {self.agreement:.2%}" if self.agreement is not None else ""]
        parts.append(f"KL <= {self.kl:g}" if self.kl is not None else "")
        return " and ".join(p for p in parts if p)

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> DenseTarget:
        _strict_keys(data, {f.name for f in fields(cls)}, "recipe 'dense_target'")
        return cls(**data)


def _target(method: str, pattern: object, sparsity: object) -> tuple[Pattern | None, float | None]:
    """The k:n pattern (``None`` for unstructured masks) and sparsity of a config: the one
    place a prune's pattern is parsed and matched against its method."""
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


@dataclass(frozen=True)
class PruneConfig:
    """Everything :func:`knsparse.prune` does to a model, validated on construction.

    Attributes:
        method: a :class:`MethodConfig`, or a method name (its options at their defaults).
        pattern: ``"2:4"``, ``"8:16"``, ``"2:4/crs"`` (conv weights grouped along
            ``weight.flatten(1)``) or a :class:`~knsparse.core.pattern.Pattern`; ``None`` with
            ``sparsity`` for unstructured masks. Default ``"2:4"``.
        sparsity: the unstructured target (a fraction); with ``cast``/``cast-conv`` and a k:n
            pattern, the sparsity of the unstructured pre-mask that free restoration starts from.
        permute: a :class:`PermuteConfig` (``True``: default search options), or ``None``.
        repair: a :class:`RepairConfig` (or ``"asr"`` / ``"layerwise"`` / ``"bn"``), or ``None``.
        calibration: a :class:`CalibrationConfig`.
        diagnostics: a :class:`DiagnosticsConfig` (none by default).
        keep_dense: layer names or glob patterns (``"head"``, ``"blocks.0.*"``) never pruned;
            or ``"auto"`` (with ``dense_target``): the layers kept dense are chosen to meet it.
        dense_target: a :class:`DenseTarget`: after pruning, the most harmful layers go back to
            dense until it is met (k:n patterns; needs a calibration set). ``keep_dense="auto"``
            names the same thing.
        quantize: ``None``, ``"int8"`` or ``"fp8"``: after pruning (and repair), quantize the model
            with :func:`knsparse.quantize` on the same calibration set (activation scales chosen
            by ``"auto"``); the result's model is then fake-quantized (``result.quantization``).
    """

    method: MethodConfig | str
    pattern: Pattern | str | None = "2:4"
    sparsity: float | None = None
    permute: PermuteConfig | bool | None = None
    repair: RepairConfig | str | None = None
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    diagnostics: DiagnosticsConfig = field(default_factory=DiagnosticsConfig)
    keep_dense: tuple[str, ...] | str = ()
    dense_target: DenseTarget | None = None
    quantize: str | None = None

    def __post_init__(self) -> None:
        auto = isinstance(self.keep_dense, str) and self.keep_dense == "auto"
        if auto and self.dense_target is None:
            raise ValueError(
                "keep_dense='auto' needs a target: dense_target=DenseTarget(agreement=...) or "
                "(keyword form) target_agreement= / target_kl="
            )
        if self.dense_target is not None and not isinstance(self.dense_target, DenseTarget):
            raise TypeError(f"dense_target must be a DenseTarget, got {type(self.dense_target).__name__}")
        if self.quantize is not None:
            check_choice(self.quantize, "quantize", QUANT_DTYPES)
        method = self.method if isinstance(self.method, MethodConfig) else MethodConfig(self.method)
        pattern, sparsity = _target(method.name, self.pattern, self.sparsity)
        permute = self.permute
        if isinstance(permute, bool):
            permute = PermuteConfig() if permute else None
        elif permute is not None and not isinstance(permute, PermuteConfig):
            raise TypeError(
                f"permute must be True/False or a PermuteConfig, got {type(permute).__name__} {permute!r}"
            )
        if permute is not None and pattern is None:
            raise ValueError("permute needs a k:n pattern: unstructured masks do not depend on channel order")
        repair = self.repair
        if repair is not None and not isinstance(repair, RepairConfig):
            repair = RepairConfig(repair)
        for name, value, kind in (
            ("calibration", self.calibration, CalibrationConfig),
            ("diagnostics", self.diagnostics, DiagnosticsConfig),
        ):
            if not isinstance(value, kind):
                raise TypeError(f"{name} must be a {kind.__name__}, got {type(value).__name__}")
        spec = METHODS[method.name]
        layerwise = spec.layerwise and not (spec.premask and sparsity is not None)
        if self.calibration.sequential and not layerwise:
            raise ValueError(
                "sequential=True (calibration.sequential) needs a method that decides each layer on its own "
                f"(wanda, sparsegpt, cast/cast-conv without sparsity=); got method {method.name!r}"
            )
        if self.calibration.sequential and self.diagnostics.certificate:
            raise ValueError(
                "diagnostics.certificate is measured on the dense model's layer inputs, which "
                "calibration.sequential replaces by the pruned ones: ask for one or the other"
            )
        keep_dense = () if auto else check_names(self.keep_dense, "keep_dense")
        if self.dense_target is not None and pattern is None:
            raise ValueError(
                "keep_dense='auto' (dense_target) needs a k:n pattern: it reports sparse execution"
            )
        for name, value in (
            ("method", method),
            ("pattern", pattern),
            ("sparsity", sparsity),
            ("permute", permute),
            ("repair", repair),
            ("keep_dense", keep_dense),
        ):
            object.__setattr__(self, name, value)

    @property
    def needs_calibration(self) -> bool:
        """Whether :func:`knsparse.prune` must be given ``calib`` for this config."""
        return (
            METHODS[self.method.name].calib == "required"
            or self.repair is not None
            or self.diagnostics.certificate
            or self.calibration.sequential
            or self.dense_target is not None
            or self.quantize is not None
        )

    def to_dict(self) -> dict[str, Any]:
        """The JSON-ready recipe (:meth:`from_dict` reads it back exactly)."""
        return {
            "knsparse_recipe": RECIPE_VERSION,
            "method": self.method.to_dict(),
            "pattern": None if self.pattern is None else str(self.pattern),
            "sparsity": self.sparsity,
            "permute": None if self.permute is None else self.permute.to_dict(),
            "repair": None if self.repair is None else self.repair.to_dict(),
            "calibration": self.calibration.to_dict(),
            "diagnostics": self.diagnostics.to_dict(),
            "keep_dense": list(self.keep_dense),
            "dense_target": None if self.dense_target is None else self.dense_target.to_dict(),
            "quantize": self.quantize,
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> PruneConfig:
        """A config from :meth:`to_dict`'s form; ``ValueError`` naming an unknown or bad field."""
        known = {"knsparse_recipe", "method", "pattern", "sparsity", "permute", "repair"}
        known |= {"calibration", "diagnostics", "keep_dense", "dense_target", "quantize"}
        _strict_keys(data, known, "recipe")
        version = data.get("knsparse_recipe")
        if version != RECIPE_VERSION:
            raise ValueError(f"recipe: knsparse_recipe must be {RECIPE_VERSION}, got {version!r}")
        if "method" not in data:
            raise ValueError("recipe: 'method' is required")
        method = data["method"]
        pattern = data.get("pattern", "2:4")
        return cls(
            method=MethodConfig(method) if isinstance(method, str) else MethodConfig.from_dict(method),
            pattern="unstructured" if pattern is None and data.get("sparsity") is not None else pattern,
            sparsity=data.get("sparsity"),
            permute=None if data.get("permute") is None else PermuteConfig.from_dict(data["permute"]),
            repair=None if data.get("repair") is None else RepairConfig.from_dict(data["repair"]),
            calibration=CalibrationConfig.from_dict(data.get("calibration", {})),
            diagnostics=DiagnosticsConfig.from_dict(data.get("diagnostics", {})),
            keep_dense=tuple(data.get("keep_dense", ())),
            dense_target=None
            if data.get("dense_target") is None
            else DenseTarget.from_dict(data["dense_target"]),
            quantize=data.get("quantize"),
        )

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> PruneConfig:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"recipe is not JSON: {exc}") from None
        return cls.from_dict(data)

    def save(self, path: str | Path) -> Path:
        """Write the recipe as JSON to ``path``."""
        path = check_path(path, "path")
        path.write_text(self.to_json() + "\n")
        return path

    @classmethod
    def load(cls, path: str | Path) -> PruneConfig:
        """Read a recipe written by :meth:`save`; errors name the file."""
        path = check_path(path, "path")
        if not path.is_file():
            raise FileNotFoundError(f"recipe {str(path)!r}: no such file")
        try:
            return cls.from_json(path.read_text())
        except (ValueError, TypeError) as exc:
            raise ValueError(f"recipe {str(path)!r}: {exc}") from None
