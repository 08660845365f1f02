"""Marchenko–Pastur (MP) diagnostics of weight matrices.

Conventions. A weight is looked at as a 2-D matrix ``W`` of shape ``[rows, cols]`` (a Linear
weight ``[out, in]``; a conv weight ``[Cout, Cin*kh*kw]`` — the column order does not change
singular values, so RSC and CRS views give the same spectrum). With ``N = max(rows, cols)`` and
``M = min(rows, cols)``, the spectrum studied is the ``M`` nonzero eigenvalues of
``X = WᵀW / N``, i.e. ``λ_i = s_i² / N`` for the singular values ``s_i`` of ``W``. If the entries
of ``W`` were iid with variance ``σ²``, these follow the MP law with aspect ratio ``q = M / N``
and edges ``λ± = σ² (1 ± √q)²``; the matching singular-value edge is ``σ+ = √(N λ+) =
σ (√N + √M)``. Eigenvalues are dimensionless-per-entry (units of weight²).

The fit. MP is a scale family in ``σ²``: the ``p``-quantile of MP(q, σ²) is ``σ² t_q(p)``, with
``t_q`` the standard (σ = 1) quantile. So on a Q–Q plot of the sorted bulk eigenvalues against
``t_q((i - ½)/m)`` the bulk is a line through the origin of slope ``σ²``, and the least-squares
slope ``Σ λ_i t_i / Σ t_i²`` is the closed-form minimiser of the squared quantile mismatch — no
grid over ``σ``, no kernel density estimate. Only the central quantiles (``band``, default
5%–95%) enter the fit: the soft edge fluctuates on the Tracy–Widom scale, the hard edge
(``q ≈ 1``) has an integrable singularity, and heavy-tail contamination sits at the top. Spikes
are handled by a fixed-point iteration: fit, count eigenvalues above the edge plus a
Tracy–Widom margin, drop them from the bulk, refit — it stops when the spike count repeats,
usually after 2–3 rounds. The standard quantiles come from the closed-form MP CDF (below)
inverted by bisection in its angular parameter, vectorised over every eigenvalue of every
matrix in a batch.

Closed-form CDF (σ = 1, q ≤ 1). Parametrise ``x = (1 + q) - 2√q cos θ``, ``θ ∈ [0, π]``. Then
``F(θ) = [2√q sin θ + (1 + q) θ - 2(1 - q) atan((1+√q)/(1-√q) · tan(θ/2))] / (2π q)``,
which is 0 at the lower edge, 1 at the upper edge and has derivative ``2 sin²θ / (π x)`` —
the MP density times ``dx/dθ``.

Spike threshold. The largest bulk eigenvalue fluctuates around ``λ+`` on the scale
``s = σ² (√N + √M)(1/√N + 1/√M)^{1/3} / N`` (Johnstone 2001); an eigenvalue counts as a spike
when it exceeds ``λ+ + c·s`` with ``c`` the Tracy–Widom (β = 1) quantile (default: 99%, 2.0234).
The fit error is the Kolmogorov–Smirnov distance between the empirical spectral CDF (all ``M``
eigenvalues, spikes included) and the fitted MP CDF: 0 for a perfect MP bulk, larger for
heavy-tailed or spiky layers.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import scipy.linalg
import torch
from scipy.linalg import blas
from torch import nn
from tqdm.auto import tqdm

from ..core.checks import check_ints, check_names, check_number, check_path, check_tensor
from ..core.layers import prunable_layers
from ..core.masks import check_finite

TW1_Q99 = 2.0234
"""99% quantile of the Tracy–Widom law for real (β = 1) matrices."""

_BISECTION_STEPS = 45  # halvings of [0, π]: angular error π·2⁻⁴⁵ ≈ 1e-13
_MAX_FIT_ROUNDS = 20
_FLOAT32_EPS = float(torch.finfo(torch.float32).eps)
_DEFAULT_BATCH_ELEMENTS = 1 << 26  # 64 Mi weights (256 MiB in fp32) per batch


@dataclass(frozen=True)
class MPFit:
    """The MP fit of one matrix. Eigenvalue quantities are in units of ``X = WᵀW / N``."""

    rows: int
    cols: int
    aspect_ratio: float
    """``q = M / N`` (≤ 1)."""
    sigma2: float
    """Fitted bulk variance per entry ``σ²``."""
    lambda_minus: float
    lambda_plus: float
    sigma_plus: float
    """Singular-value edge ``σ+ = √(N λ+)``, in units of the singular values of ``W``."""
    edge: float
    """Spike threshold: ``λ+`` plus the Tracy–Widom margin."""
    num_spikes: int
    """Eigenvalues above ``edge``."""
    bulk_fraction: float
    """Share of the ``M`` eigenvalues inside the bulk (between the margin-widened edges)."""
    bulk_energy: float
    """Share of ``‖W‖_F² = N Σ λ`` carried by the bulk eigenvalues."""
    fit_error: float
    """Kolmogorov–Smirnov distance between the empirical spectral CDF and the fitted MP CDF."""

    @property
    def n(self) -> int:
        return max(self.rows, self.cols)

    @property
    def m(self) -> int:
        return min(self.rows, self.cols)

    def as_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class LayerSpectrum:
    """One row of :func:`diagnose`: a layer, its MP fit, its eigenvalues and its plot."""

    name: str
    weight_shape: tuple[int, ...]
    fit: MPFit
    eigenvalues: torch.Tensor
    """``[M]`` float64 on CPU, ascending."""
    plot: Path | None = None

    def as_dict(self) -> dict[str, object]:
        row: dict[str, object] = {"name": self.name, "weight_shape": list(self.weight_shape)}
        row.update(self.fit.as_dict())
        row["plot"] = str(self.plot) if self.plot else None
        return row


# ----------------------------------------------------------------------------- the MP law


def _check_q(q: float) -> None:
    check_number(q, "q (the MP aspect ratio M/N)", low=0, high=1, low_open=True)


def _mp_input(x: object, arg: str) -> torch.Tensor:
    """``x`` as float64 for the MP law: a real tensor with values, or a number / list."""
    if isinstance(x, torch.Tensor):
        check_tensor(x, arg, floating=False)
    elif not isinstance(x, (int, float, list, tuple)) or isinstance(x, bool):
        raise TypeError(f"{arg} must be a tensor or numbers, got {type(x).__name__}")
    out = torch.as_tensor(x, dtype=torch.float64)
    if out.numel() == 0:
        raise ValueError(f"{arg} is empty")
    return out


def _theta_cdf(theta: torch.Tensor, q: float) -> torch.Tensor:
    """Standard MP CDF as a function of the angle ``θ`` (see the module docstring)."""
    sq = math.sqrt(q)
    half = theta / 2
    arc = torch.atan2((1 + sq) * torch.sin(half), (1 - sq) * torch.cos(half))
    return (2 * sq * torch.sin(theta) + (1 + q) * theta - 2 * (1 - q) * arc) / (2 * math.pi * q)


def _theta_of(x: torch.Tensor, q: float) -> torch.Tensor:
    sq = math.sqrt(q)
    return torch.arccos(((1 + q - x) / (2 * sq)).clamp(-1.0, 1.0))


def mp_cdf(x: torch.Tensor, q: float, sigma2: float | torch.Tensor = 1.0) -> torch.Tensor:
    """MP cumulative distribution ``P(λ ≤ x)`` for aspect ratio ``q`` and variance ``σ²``.

    ``x`` in eigenvalue units of ``WᵀW / N``; ``sigma2`` a float or a tensor broadcastable to
    ``x``. Exactly 0 below ``λ-`` and 1 above ``λ+``.
    """
    _check_q(q)
    x = _mp_input(x, "x")
    if not isinstance(sigma2, torch.Tensor):
        check_number(sigma2, "sigma2", low=0, low_open=True)
    return _theta_cdf(_theta_of(x / sigma2, q), q)


def mp_pdf(x: torch.Tensor, q: float, sigma2: float = 1.0) -> torch.Tensor:
    """MP density ``√((λ+ - x)(x - λ-)) / (2π q σ² x)``, zero outside ``[λ-, λ+]``."""
    _check_q(q)
    x = _mp_input(x, "x")
    check_number(sigma2, "sigma2", low=0, low_open=True)
    lo, hi = sigma2 * (1 - math.sqrt(q)) ** 2, sigma2 * (1 + math.sqrt(q)) ** 2
    inside = (x > lo) & (x < hi) & (x > 0)
    safe = torch.where(inside, x, torch.ones_like(x))
    dens = torch.sqrt(((hi - safe) * (safe - lo)).clamp_min(0)) / (2 * math.pi * q * sigma2 * safe)
    return torch.where(inside, dens, torch.zeros_like(x))


def mp_quantile(p: torch.Tensor, q: float) -> torch.Tensor:
    """Standard (σ² = 1) MP quantile: the ``x`` with ``mp_cdf(x, q) = p``, for ``p`` in [0, 1].

    Bisection on ``θ ∈ [0, π]`` (the CDF is increasing in ``θ``), elementwise in float64.
    """
    _check_q(q)
    p = _mp_input(p, "p").clamp(0.0, 1.0)
    lo = torch.zeros_like(p)
    hi = torch.full_like(p, math.pi)
    for _ in range(_BISECTION_STEPS):
        mid = (lo + hi) / 2
        below = _theta_cdf(mid, q) < p
        lo = torch.where(below, mid, lo)
        hi = torch.where(below, hi, mid)
    theta = (lo + hi) / 2
    return 1 + q - 2 * math.sqrt(q) * torch.cos(theta)


# ----------------------------------------------------------------------------- the fit


def _tw_scales(n: int, m: int) -> tuple[float, float]:
    """Tracy–Widom fluctuation scales of the upper and lower soft edges, for σ² = 1."""
    sn, sm = math.sqrt(n), math.sqrt(m)
    upper = (sn + sm) * (1 / sn + 1 / sm) ** (1 / 3) / n
    lower = (sn - sm) * max(1 / sm - 1 / sn, 0.0) ** (1 / 3) / n
    return upper, lower


def fit_eigenvalues(
    eigenvalues: torch.Tensor,
    shape: tuple[int, int],
    *,
    tw_quantile: float = TW1_Q99,
    band: tuple[float, float] = (0.05, 0.95),
    eps: float = _FLOAT32_EPS,
) -> list[MPFit]:
    """Fit MP laws to a batch of spectra of matrices of one ``shape``.

    Args:
        eigenvalues: ``[B, M]`` or ``[M]`` eigenvalues of ``WᵀW / N`` (any order), ``M =
            min(shape)``, ``N = max(shape)``.
        shape: ``(rows, cols)`` of the matrices.
        tw_quantile: multiplier of the Tracy–Widom scale added to ``λ+`` to call a spike.
        band: the central quantile range of the bulk used in the least-squares fit.
        eps: machine epsilon of the matrices' dtype. Eigenvalues below the numerical-rank
            tolerance ``λmax · (N · eps)²`` (singular values below ``σmax · N · eps``, as
            ``numpy.linalg.matrix_rank`` judges), or below the fp64 eigensolver's own error
            ``λmax · N · eps64``, are rounding noise and count as exact zeros, so a rank-``r``
            matrix without noise has an all-zero bulk and ``r`` spikes.

    Returns:
        One :class:`MPFit` per matrix.
    """
    check_number(tw_quantile, "tw_quantile", low=0)
    check_number(eps, "eps", low=0, high=1, low_open=True, high_open=True)
    if not (isinstance(band, tuple) and len(band) == 2):
        raise TypeError(f"band must be a (lo, hi) tuple, got {band!r}")
    check_number(band[0], "band[0]", low=0, high=1)
    check_number(band[1], "band[1]", low=band[0], high=1, low_open=True)
    dims = check_ints(shape, "shape", low=1)
    if len(dims) != 2:
        raise ValueError(f"shape must be (rows, cols), got {shape!r}")
    rows, cols = dims
    n, m = max(rows, cols), min(rows, cols)
    check_tensor(eigenvalues, "eigenvalues", dims=(1, 2))
    lam = eigenvalues.detach().to("cpu", torch.float64)
    if lam.dim() == 1:
        lam = lam.unsqueeze(0)
    if lam.dim() != 2 or lam.shape[1] != m:
        raise ValueError(
            f"expected eigenvalues of shape [B, {m}] for matrices {shape}, got {tuple(lam.shape)}"
        )
    if not torch.isfinite(lam).all():
        raise ValueError(f"eigenvalues of a {shape} matrix are not finite (NaN/Inf in the weight?)")
    if not 0.0 <= band[0] < band[1] <= 1.0:
        raise ValueError(f"band must satisfy 0 <= lo < hi <= 1, got {band}")
    lam = lam.clamp_min(0).sort(dim=1).values
    rank_tol = max((n * eps) ** 2, n * torch.finfo(torch.float64).eps)
    lam = torch.where(lam <= lam[:, -1:] * rank_tol, 0.0, lam)  # below numerical rank: zero
    q = m / n
    sq = math.sqrt(q)
    up_std, low_std = _tw_scales(n, m)
    edge_std = (1 + sq) ** 2 + tw_quantile * up_std
    idx = torch.arange(1, m + 1, dtype=torch.float64)

    spikes = torch.zeros(lam.shape[0], dtype=torch.long)
    for _ in range(_MAX_FIT_ROUNDS):
        bulk_size = (m - spikes.clamp(max=m // 2)).to(torch.float64).unsqueeze(1)
        p = (idx - 0.5) / bulk_size
        used = (idx <= bulk_size) & (p >= band[0]) & (p <= band[1])
        t = mp_quantile(p, q) * used
        sigma2 = (lam * t).sum(1) / (t * t).sum(1).clamp_min(1e-300)
        new_spikes = (lam > (sigma2 * edge_std).unsqueeze(1)).sum(1)
        converged = bool((new_spikes == spikes).all())
        spikes = new_spikes
        if converged:
            break

    scale = sigma2.clamp_min(1e-300).unsqueeze(1)
    cdf = mp_cdf(lam, q, scale)
    ks = torch.maximum(idx / m - cdf, cdf - (idx - 1) / m).amax(1)
    ks = torch.where(sigma2 > 0, ks, torch.zeros_like(ks))  # an all-zero matrix is a (degenerate) MP
    low = sigma2 * ((1 - sq) ** 2 - tw_quantile * low_std) if q < 1 else torch.full_like(sigma2, -math.inf)
    inside = (lam >= low.unsqueeze(1)) & (lam <= (sigma2 * edge_std).unsqueeze(1))
    energy = lam.sum(1)
    bulk_energy = torch.where(energy > 0, (lam * inside).sum(1) / energy.clamp_min(1e-300), 1.0)

    fits = []
    for b in range(lam.shape[0]):
        s2 = float(sigma2[b])
        lp = s2 * (1 + sq) ** 2
        fits.append(
            MPFit(
                rows=rows,
                cols=cols,
                aspect_ratio=q,
                sigma2=s2,
                lambda_minus=s2 * (1 - sq) ** 2,
                lambda_plus=lp,
                sigma_plus=math.sqrt(n * lp),
                edge=s2 * edge_std,
                num_spikes=int(spikes[b]),
                bulk_fraction=float(inside[b].double().mean()),
                bulk_energy=float(bulk_energy[b]),
                fit_error=float(ks[b]),
            )
        )
    return fits


def _as_matrix(w: torch.Tensor, name: str | None = None) -> torch.Tensor:
    label = f"layer {name!r}" if name else "weight"
    if w.dim() == 4:
        w = w.reshape(w.shape[0], -1)
    if w.dim() != 2:
        raise ValueError(f"{label}: expected a 2-D Linear or 4-D Conv2d weight, got shape {tuple(w.shape)}")
    check_finite(w, label)
    return w


def _gram_eigenvalues(w: torch.Tensor) -> torch.Tensor:
    """CPU ``[rows, cols]`` → ``[M]`` ascending eigenvalues of the fp64 Gram of the smaller side.

    BLAS ``syrk`` forms one triangle of the ``M x M`` Gram (half a GEMM), LAPACK's symmetric
    eigensolver returns its eigenvalues (no vectors); ``bench/bench_spectral.py`` times it against
    torch's full fp64 GEMM + ``eigvalsh`` and an fp32 SVD per layer shape.
    """
    x = w.detach().to(torch.float64).numpy().T  # Fortran-ordered [cols, rows] view, no copy
    tall = w.shape[0] >= w.shape[1]
    gram = blas.dsyrk(1.0, x, trans=0 if tall else 1, lower=1)  # tall: WᵀW, wide: WWᵀ
    return torch.from_numpy(
        scipy.linalg.eigh(gram, lower=True, eigvals_only=True, overwrite_a=True, check_finite=False)
    )


def batch_eigenvalues(ws: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """``B`` matrices of one shape → ``[B, M]`` eigenvalues of ``WᵀW / N`` (ascending, float64
    on CPU).

    ``ws`` is a ``[B, rows, cols]`` tensor or a sequence of ``B`` ``[rows, cols]`` tensors on one
    device. The eigenvalues are those of the fp64 Gram of the smaller side, on the weights'
    device (CPU: BLAS/LAPACK per matrix, :func:`_gram_eigenvalues`; GPU: one batched GEMM and
    ``torch.linalg.eigvalsh``). Products of fp32 entries are exact in fp64, so an eigenvalue's
    error is ~``eps64·λmax``; an fp32 SVD's is ~``2·eps32·s_max·s_i`` in ``s_i²``, larger for
    every eigenvalue with ``λmax/λ_i`` below ~1e12 (all that can be resolved); on CPU the Gram
    route is also about 2x faster over whole ViT-B/ResNet-50 models (``bench/results/spectral.json``,
    ``eigenvalue_routes``).
    """
    if isinstance(ws, torch.Tensor):
        check_tensor(ws, "ws", dims=(3,))
    elif isinstance(ws, (str, bytes)) or not isinstance(ws, Sequence):
        raise TypeError(
            f"ws must be a [B, rows, cols] tensor or a sequence of matrices, got {type(ws).__name__}"
        )
    mats = [check_tensor(w, f"ws[{i}]", dims=(2,)) for i, w in enumerate(ws)]
    shapes = {tuple(w.shape) for w in mats}
    if not mats or len(shapes) != 1 or len(mats[0].shape) != 2:
        raise ValueError(f"expected one or more 2-D matrices of one shape, got shapes {sorted(shapes)}")
    rows, cols = mats[0].shape
    if mats[0].device.type == "cpu":
        eig = torch.stack([_gram_eigenvalues(w) for w in mats])
    else:
        x = torch.stack([w.detach().double() for w in mats])
        gram = x.transpose(1, 2) @ x if rows >= cols else x @ x.transpose(1, 2)
        eig = torch.linalg.eigvalsh(gram).cpu()
    return eig.clamp_min(0) / max(rows, cols)


def mp_fit(w: torch.Tensor, **options: object) -> MPFit:
    """MP fit of one Linear ``[out, in]`` or Conv2d ``[Cout, Cin, kh, kw]`` weight.

    Options are those of :func:`fit_eigenvalues` (``tw_quantile``, ``band``).
    """
    mat = _as_matrix(check_tensor(w, "w", dims=(2, 4)))
    options.setdefault("eps", _eps_of(mat.dtype))
    return fit_eigenvalues(batch_eigenvalues(mat.unsqueeze(0)), tuple(mat.shape), **options)[0]


def _eps_of(dtype: torch.dtype) -> float:
    """The rounding scale of weights stored in ``dtype`` (never finer than float64's)."""
    return max(torch.finfo(dtype).eps, torch.finfo(torch.float64).eps)


def mp_fit_batch(ws: torch.Tensor, **options: object) -> list[MPFit]:
    """MP fits of ``B`` matrices of one shape ``[B, rows, cols]`` (one batched fit)."""
    check_tensor(ws, "ws", dims=(3,))
    options.setdefault("eps", _eps_of(ws.dtype))
    return fit_eigenvalues(batch_eigenvalues(ws), (ws.shape[1], ws.shape[2]), **options)


def fit_weights(
    weights: Mapping[str, torch.Tensor],
    *,
    max_batch_elements: int = _DEFAULT_BATCH_ELEMENTS,
    progress: bool = False,
    **options: object,
) -> dict[str, LayerSpectrum]:
    """MP-fit many named weights: equal ``[rows, cols]`` shapes are fitted together (one
    batched eigensolve on a GPU, see :func:`batch_eigenvalues`).

    Batches are split so that no batch holds more than ``max_batch_elements`` weights.
    Returns ``{name: LayerSpectrum}`` in the order of ``weights``.
    """
    if not isinstance(weights, Mapping):
        raise TypeError(f"weights must be a {{name: weight}} mapping, got {type(weights).__name__}")
    check_number(max_batch_elements, "max_batch_elements", low=1, integer=True)
    groups: dict[tuple[int, int, torch.device, torch.dtype], list[str]] = defaultdict(list)
    mats = {}
    for name, w in weights.items():
        m = mats[name] = _as_matrix(check_tensor(w, f"weights[{name!r}]", dims=(2, 4)), name)
        groups[(m.shape[0], m.shape[1], m.device, m.dtype)].append(name)
    chunks = []
    for (rows, cols, _, _), names in groups.items():
        per_chunk = max(1, max_batch_elements // (rows * cols))
        chunks += [names[i : i + per_chunk] for i in range(0, len(names), per_chunk)]
    out: dict[str, LayerSpectrum] = {}
    for names in tqdm(chunks, desc="MP fit", unit="batch", disable=not progress):
        eigs = batch_eigenvalues([mats[nm] for nm in names])
        eps = options.get("eps", _eps_of(mats[names[0]].dtype))
        fits = fit_eigenvalues(eigs, tuple(mats[names[0]].shape), **{**options, "eps": eps})
        for i, nm in enumerate(names):
            out[nm] = LayerSpectrum(nm, tuple(weights[nm].shape), fits[i], eigs[i])
    return {nm: out[nm] for nm in weights}


# ----------------------------------------------------------------------------- plots and the model view


def _plot_filename(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name or "weight") + ".png"


def plot_esd(spectrum: LayerSpectrum, path: str | Path) -> Path:
    """PNG of the empirical spectral density against the fitted MP density.

    Histogram of the eigenvalues (normalised so that the area is the share of eigenvalues
    shown), the fitted MP density, ``λ+`` and the spike threshold. Eigenvalues far beyond the
    edge are counted in the legend rather than squeezing the bulk.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    if not isinstance(spectrum, LayerSpectrum):
        raise TypeError(f"spectrum must be a LayerSpectrum, got {type(spectrum).__name__}")
    path = check_path(path, "path")
    fit, lam = spectrum.fit, spectrum.eigenvalues.numpy()
    x_max = max(1.3 * fit.edge, float(np.quantile(lam, 0.9)) * 1.3, 1e-30)
    shown = lam[lam <= x_max]
    fig = Figure(figsize=(6.4, 4.0))
    FigureCanvasAgg(fig)
    ax = fig.add_subplot(1, 1, 1)
    bins = np.linspace(0.0, x_max, 81)
    counts, _ = np.histogram(shown, bins=bins)
    ax.bar(
        bins[:-1],
        counts / (lam.size * (bins[1] - bins[0])),
        width=bins[1] - bins[0],
        align="edge",
        alpha=0.5,
        label="empirical ESD",
    )
    xs = torch.linspace(0.0, x_max, 600, dtype=torch.float64)
    ax.plot(
        xs.numpy(),
        mp_pdf(xs, fit.aspect_ratio, fit.sigma2).numpy(),
        color="C3",
        label=f"MP fit, σ²={fit.sigma2:.3g}",
    )
    ax.axvline(fit.lambda_plus, color="C3", linestyle="--", label=f"λ+={fit.lambda_plus:.3g}")
    ax.axvline(fit.edge, color="k", linestyle=":", label="λ+ + TW margin")
    beyond = int((lam > x_max).sum())
    if beyond:
        ax.plot([], [], " ", label=f"{beyond} eigenvalue(s) > {x_max:.3g} (max {lam.max():.3g})")
    ax.set_xlabel("eigenvalue of WᵀW/N")
    ax.set_ylabel("density")
    ax.set_title(
        f"{spectrum.name} {list(spectrum.weight_shape)}  q={fit.aspect_ratio:.3g}  "
        f"spikes={fit.num_spikes}  KS={fit.fit_error:.3f}",
        fontsize=9,
    )
    ax.legend(fontsize=8)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90, bbox_inches="tight")
    return path


def diagnose(
    model: nn.Module,
    plot_dir: str | Path | None = None,
    *,
    layers: Iterable[str] | None = None,
    progress: bool = True,
    **options: object,
) -> list[LayerSpectrum]:
    """One MP-fit row per prunable layer (Linear, ungrouped Conv2d) of ``model``.

    Layers whose 2-D view has the same shape are fitted in one batch (see :func:`fit_weights`).
    With ``plot_dir``, writes ``<plot_dir>/<layer name>.png`` (see :func:`plot_esd`) and records
    the path.
    ``layers`` restricts the rows to those names. Options go to :func:`fit_eigenvalues`.
    """
    found = prunable_layers(model)
    if plot_dir is not None:
        check_path(plot_dir, "plot_dir")
    if layers is not None:
        wanted = list(check_names(layers, "layers"))
        missing = [nm for nm in wanted if nm not in found]
        if missing:
            raise ValueError(f"not prunable layers of this model: {missing}")
        found = {nm: found[nm] for nm in wanted}
    spectra = fit_weights(
        {nm: mod.weight.detach() for nm, mod in found.items()}, progress=progress, **options
    )
    if plot_dir is None:
        return list(spectra.values())
    return [replace(s, plot=plot_esd(s, Path(plot_dir) / _plot_filename(nm))) for nm, s in spectra.items()]
