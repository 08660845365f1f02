"""CAST: certificate-guided k:n selection with free restoration (``cast``, ``cast-conv``).

The certificate of :func:`knsparse.prune` bounds the effect of removing ``R`` from a layer by
the data-path budget ``B_T(R) = (2/|T|) Σ_s ‖R ψ(s)‖_∞``. Since ``‖v‖_∞ ≤ ‖v‖_2`` and by
Jensen, ``B_T(R) ≤ 2 sqrt(Σ_i r_iᵀ H r_i)`` with ``r_i`` the removed part of output row ``i``
and ``H = (1/|T|) Σ_s Σ_t x_{s,t} x_{s,t}ᵀ`` the per-sample Gram matrix of the layer's GEMM
inputs. CAST chooses the ``k`` kept entries of every group to make this bound small: restricted
to one group ``g`` (the ``n × n`` diagonal block ``H_g``, cross-group terms dropped), it
removes entries one at a time, each time the one whose removal adds least to ``r_gᵀ H_g r_g``
— the increase for entry ``j`` is ``2 w_j (H_g r_g)_j + (H_g)_jj w_j²`` — until ``k`` remain.
With a diagonal ``H`` this is pruning by ``|w_j|·‖x_j‖``; with ``H = I`` it is magnitude k:n.

*Robust metric.* The calibration set is a small sample, and on a BatchNorm network a one-shot
mask shifts the statistics the next layers were trained on. CAST therefore minimises the bound
under ``H_α = (1 - α) H + α h̄ I`` (``h̄`` the layer's mean input energy per column, ``α`` =
``shrinkage``): ``h̄ I`` bounds the worst input direction of the same energy, so ``H_α`` mixes
the bound for the calibration inputs with a bound that holds for any inputs. ``α = 0`` trusts
the calibration data fully, ``α = 1`` is magnitude k:n; the default ``CAST_SHRINKAGE`` was
chosen among {0, 0.25, 0.5, 0.75, 1} on held-out training images of the built-in digits models
(``bench/quality_select.py``), never on their test split.

*Free restoration.* With an earlier unstructured mask (``premask``), entries it pruned are
removed first. A group left with fewer than ``k`` survivors gets its best pruned entries (the
ones the greedy order would remove last) back up to ``k``: the k:n kernel executes ``k`` slots
per group anyway, so they cost nothing. Their number is reported per layer.

*Reconstruction* (on by default, ``CAST_RECONSTRUCT``; ``reconstruct=False`` turns it off): the
kept weights of every layer are then re-fitted by least squares on the layer's damped calibration
Gram inside the fixed mask (:func:`knsparse.pruning.methods.obs.refit_kept_weights`): the mask is CAST's, the
values minimise the layer's output error on the calibration inputs. A layer whose calibration is
too thin for the re-fit (:func:`knsparse.pruning.methods.obs.refit_too_thin`) keeps CAST's mask on
its dense weights, and its decision's ``fallback`` says why; so does a layer whose calibration
inputs are all zero (magnitude mask).

``cast`` applies the data-path selection to Linear layers and magnitude k:n (``H = I``) to
convolutions; ``cast-conv`` also uses the data path for convolutions (im2col statistics in the
reduction order, RSC by default).
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ...core.pattern import Pattern
from .base import Decision, Layer, layer_hessian
from .obs import DAMP, refit_kept_weights, refit_too_thin, relative_output_error
from .ser import hybrid

CAST_SHRINKAGE = 0.0
"""Default ``α`` of the robust metric (module docstring)."""
CAST_RECONSTRUCT = True
"""Default of the least-squares re-fit of the kept weights (module docstring): on, because
held-out data favours it (mean validation gain of ``cast + refit`` over ``cast`` on the digits
models, ``bench/results/oneshot_quality.md``). The cost: ``cast`` collects the full ``K × K``
Gram of every layer (memory-bounded batches of layers, as ``sparsegpt``)."""


def greedy_group_select(
    weight: torch.Tensor, gram: torch.Tensor, pattern: Pattern, premask: torch.Tensor | None = None
) -> torch.Tensor:
    """Keep ``k`` of every group of ``n`` columns by greedy elimination of the least costly entry.

    Args:
        weight: ``[out, K]``.
        gram: ``[K/n, n, n]`` Gram block of each column group (any symmetric PSD blocks).
        pattern: the k:n pattern.
        premask: optional ``[out, K]`` bool earlier mask; its pruned entries go first.

    Returns:
        ``[out, K]`` bool mask with exactly ``k`` True per group. Ties go to the lowest index
        (removed first).
    """
    out, k_dim = weight.shape
    n, k = pattern.n, pattern.k
    groups = k_dim // n
    w = weight.float().reshape(out, groups, n)
    h = gram.to(w.device, torch.float32)
    h_t = h.transpose(1, 2)  # h_t[g, j] is column j of H_g
    diag = h.diagonal(dim1=-2, dim2=-1)
    pre = None if premask is None else premask.reshape(out, groups, n)
    removed = torch.zeros(out, groups, n, dtype=torch.bool, device=w.device)
    h_r = torch.zeros_like(w)
    group_index = torch.arange(groups, device=w.device).expand(out, groups)
    for _ in range(n - k):
        cost = 2 * w * h_r + diag * w.square()
        candidates = ~removed
        if pre is not None:
            outside = candidates & ~pre
            candidates = torch.where(outside.any(-1, keepdim=True), outside, candidates)
        j = cost.masked_fill(~candidates, torch.inf).argmin(-1)
        removed.scatter_(-1, j.unsqueeze(-1), True)
        h_r += h_t[group_index, j] * w.gather(-1, j.unsqueeze(-1))
    return (~removed).reshape(out, k_dim)


def robust_gram(gram: torch.Tensor, shrinkage: float) -> torch.Tensor:
    """``(1 - α) H + α h̄ I`` for block Grams ``[G, n, n]``, ``h̄`` the mean diagonal entry."""
    mean_energy = gram.diagonal(dim1=-2, dim2=-1).mean()
    eye = torch.eye(gram.shape[-1], dtype=gram.dtype, device=gram.device)
    return (1 - shrinkage) * gram + shrinkage * mean_energy * eye


def cast(
    layers: Mapping[str, Layer],
    pattern: Pattern | None,
    sparsity: float | None = None,
    *,
    convs: bool = False,
    shrinkage: float = CAST_SHRINKAGE,
    switch: float = 0.5,
    reservoir: float = 0.1,
    reconstruct: bool = CAST_RECONSTRUCT,
    damp: float = DAMP,
) -> dict[str, Decision]:
    """CAST k:n masks; convolutions get the data-path selection only with ``convs=True``
    (the ``cast-conv`` method), else magnitude k:n.

    ``shrinkage`` is ``α`` of the robust metric (module docstring). With ``sparsity``, an
    unstructured Hybrid pre-mask at that sparsity (``switch``, ``reservoir`` as in
    :func:`knsparse.pruning.methods.ser.hybrid`) is applied first and the k:n step restores pruned
    entries for free where a group has fewer than ``k`` left. ``reconstruct`` re-fits the kept
    weights on the calibration Gram damped by ``damp`` (module docstring).
    """
    method = "cast-conv" if convs else "cast"
    if pattern is None:
        raise ValueError(f"method {method!r} needs a k:n pattern (e.g. '2:4')")
    if not 0.0 <= shrinkage <= 1.0:
        raise ValueError(f"shrinkage must be in [0, 1], got {shrinkage}")
    premasks = None
    if sparsity is not None:
        premasks = hybrid(layers, None, sparsity, switch=switch, reservoir=reservoir)
    out = {}
    for name, lay in layers.items():
        data_path = convs or not lay.is_conv
        groups = lay.weight.shape[1] // pattern.n
        fallback = None
        if data_path:
            if lay.stats is None:
                raise ValueError(f"method {method!r} needs calibration statistics for layer {name!r}")
            gram = robust_gram(lay.stats.group_gram(), shrinkage)
            if not bool((gram.diagonal(dim1=-2, dim2=-1) > 0).any()):
                data_path, fallback = (
                    False,
                    f"layer {name!r}: the calibration inputs are all zero: magnitude mask",
                )
        if not data_path:
            gram = torch.eye(pattern.n).expand(groups, pattern.n, pattern.n)
        pre = None if premasks is None else premasks[name].mask
        mask = greedy_group_select(lay.weight, gram, pattern, pre)
        restored = 0 if pre is None else int((mask & ~pre).sum())
        rule = f"{method} {pattern}" if data_path else f"magnitude {pattern}"
        extra = {} if premasks is None else {"premask_sparsity": premasks[name].target_sparsity}
        new = None
        if reconstruct and fallback is None:
            thin = refit_too_thin(lay.stats.rows, lay.weight.shape[1]) if lay.stats is not None else None
            if thin is not None:
                fallback = f"{thin}: CAST's mask on the dense weights"
            else:
                h = layer_hessian(lay, method, damp)
                new = refit_kept_weights(lay.weight, h, mask)
                extra["output_error"] = relative_output_error(lay.weight, new, h)
                rule += " + refit"
        out[name] = Decision(
            mask, rule, pattern.sparsity, new, freely_restored=restored, extra=extra, fallback=fallback
        )
    return out
