"""SparseGPT k:n masks with OBS reconstruction of the kept weights (``sparsegpt``).

The method of Frantar & Alistarh (2023) applied layer by layer in reduction view (conv weights
in the order of ``conv_order``, whose im2col Gram :mod:`knsparse.pruning.calibration` collects in the
same column order, so the masks stay TensorRT-eligible with the default ``"rsc"``). The sweep
itself lives in :mod:`knsparse.pruning.methods.obs`. Calibrated on the dense model (one pass) or, with
``knsparse.prune(..., sequential=True)``, each layer on the outputs of the already pruned
layers before it.
"""

from __future__ import annotations

from collections.abc import Mapping

from ...core.masks import nm_mask
from ...core.pattern import Pattern
from .base import Decision, Layer, fallback_scores, layer_hessian
from .obs import (
    BLOCKSIZE,
    DAMP,
    UnusableGram,
    inverse_cholesky,
    refit_kept_weights,
    refit_too_thin,
    relative_output_error,
    sparsegpt_sweep,
)


def sparsegpt(
    layers: Mapping[str, Layer],
    pattern: Pattern | None,
    sparsity: float | None = None,
    *,
    damp: float = DAMP,
    blocksize: int = BLOCKSIZE,
    refit: bool = False,
) -> dict[str, Decision]:
    """SparseGPT k:n masks and re-fitted weights for every layer.

    ``damp``: damping as a fraction of the mean diagonal of the Gram (default 1%, as published);
    ``blocksize``: columns per lazy-update block (speed only, same result); ``refit``: after the
    sweep, re-solve the kept weights by least squares in SparseGPT's mask (exactly on small layers,
    by conjugate gradients from the sweep's weights on large ones:
    :func:`knsparse.pruning.methods.obs.refit_kept_weights`; the sweep's
    kept weights left of a pruned one are never updated again, the least-squares solution is never
    worse on the calibration set). Each
    decision's ``extra["output_error"]`` is the relative output error on the calibration set.

    Any calibration size runs: a layer with fewer calibration rows than the re-fit needs
    (:func:`knsparse.pruning.methods.obs.refit_too_thin`) keeps the sweep's weights, and a layer
    whose Gram cannot drive the sweep (all-zero inputs; not positive definite with ``damp=0``)
    gets the scorer's mask alone (:func:`knsparse.pruning.methods.base.fallback_scores`); each
    decision's ``fallback`` says so.
    """
    if pattern is None:
        raise ValueError("method 'sparsegpt' needs a k:n pattern (e.g. '2:4')")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    if damp < 0:
        raise ValueError(f"damp must be >= 0, got {damp}")
    out = {}
    for name, lay in layers.items():
        try:
            h = layer_hessian(lay, "sparsegpt", damp)
            mask, new = sparsegpt_sweep(lay.weight, inverse_cholesky(h, name), pattern, blocksize=blocksize)
        except UnusableGram as err:
            scores, rule = fallback_scores(lay)
            why = f"{err}: {rule} mask, weights kept"
            out[name] = Decision(
                nm_mask(scores, pattern, name=name), f"{rule} {pattern}", pattern.sparsity, fallback=why
            )
            continue
        rule = f"sparsegpt {pattern}"
        thin = refit_too_thin(lay.stats.rows, lay.weight.shape[1]) if refit else None
        if refit and thin is None:
            new = refit_kept_weights(lay.weight, h, mask, start=new)
            rule += " + refit"
        error = relative_output_error(lay.weight, new, h)
        why = None if thin is None else f"{thin}: SparseGPT's swept weights"
        out[name] = Decision(
            mask, rule, pattern.sparsity, weight=new.float(), extra={"output_error": error}, fallback=why
        )
    return out
