"""Calibration: stream per-layer statistics of GEMM inputs through forward hooks.

A prunable layer computes ``y = W x`` for every *GEMM input row* ``x`` of length ``K``: a
token's features for a Linear, an im2col patch for a Conv2d — with the patch entries in the
same order as the weight's reduction view (``"rsc"`` by default, see :mod:`knsparse.core.masks`), so
column ``j`` of a statistic lines up with column ``j`` of the reduction-view weight.

Nothing is stored per input: hooks fold every batch into fixed-size accumulators (``[K]`` column
sums of squares, optionally ``[K/n, n, n]`` block Gram matrices or the full ``[K, K]`` Gram
``XᵀX`` — the layer Hessian of SparseGPT/OBS), so memory does not grow with the calibration set.
``calib`` is any re-iterable of batches (a list, a DataLoader); a batch is a tensor, a mapping of
keyword inputs or an ``(inputs, target)`` tuple (see :mod:`.batches`).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from tqdm.auto import tqdm

from ..core.pattern import ConvOrder
from ..utils import distributed
from ..utils.batches import model_batches, model_device
from ..utils.modes import evaluation

RowsCallback = Callable[[str, torch.Tensor], None]


class _AllSeen(Exception):
    """Raised by a hook to end a forward pass early once every listed layer has run."""


def check_calibration(model: nn.Module, calib: object) -> None:
    """Refuse a calibration set the model cannot use, before anything is computed or changed:
    not a re-iterable (see :func:`check_reiterable`), no batch, a batch without an input tensor,
    or a first batch the model cannot run (wrong shape, integer labels instead of images) —
    checked with one forward pass of the first batch in eval mode, without gradients, every
    module's training flag restored. Checked even where the method itself reads no statistics,
    so a wrong ``calib`` never passes silently."""
    check_reiterable(calib)
    first = next(model_batches(calib, model_device(model)))
    with torch.no_grad(), evaluation(model):
        first(model)


def check_reiterable(calib: object) -> None:
    """Raise ``ValueError`` unless ``calib`` is an iterable that can be iterated again.

    Pruning streams the calibration set more than once (statistics, then the certificate),
    so a one-shot iterator or generator is refused before anything is computed.
    """
    if isinstance(calib, (str, bytes)) or not isinstance(calib, Iterable):
        raise ValueError(f"calib must be an iterable of input batches, got {type(calib).__name__}")
    if iter(calib) is calib:
        raise ValueError(
            "calib is a one-shot iterator/generator; pass a re-iterable of batches "
            "(a list of tensors or a DataLoader) because it is streamed more than once"
        )


def gemm_input_rows(module: nn.Module, x: torch.Tensor, conv_order: ConvOrder = "rsc") -> torch.Tensor:
    """The layer's GEMM input rows ``[B, T, K]`` for an input batch ``x``.

    Linear: ``x [B, ..., in]`` → ``[B, T, in]`` (``T`` = tokens, 1 for a flat input).
    Conv2d: im2col patches ``[B, L, K]`` (``L`` output positions) with ``K`` in ``conv_order``.
    """
    if isinstance(module, nn.Linear):
        if x.dim() == 1:
            x = x.unsqueeze(0)
        return x.reshape(x.shape[0], -1, x.shape[-1])
    if isinstance(module, nn.Conv2d):
        if x.dim() == 3:
            x = x.unsqueeze(0)
        padding = module.padding
        if isinstance(padding, str) or module.padding_mode != "zeros":
            mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
            x = F.pad(x, module._reversed_padding_repeated_twice, mode=mode)
            padding = 0
        cols = F.unfold(x, module.kernel_size, module.dilation, padding, module.stride)  # [B, C*R*S, L]
        b, _, positions = cols.shape
        if conv_order == "rsc":
            rs = module.kernel_size[0] * module.kernel_size[1]
            cols = cols.reshape(b, x.shape[1], rs, positions).transpose(1, 2).reshape(b, -1, positions)
        return cols.transpose(1, 2)
    raise TypeError(f"expected nn.Linear or nn.Conv2d, got {type(module).__name__}")


def stream_layer_inputs(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable[object],
    on_rows: RowsCallback,
    *,
    conv_order: ConvOrder = "rsc",
    progress: bool = False,
    desc: str = "calibration",
    stop_early: bool = False,
    raw: bool = False,
) -> int:
    """Run ``model`` over ``calib`` (eval mode, no grad) and call ``on_rows(name, rows)`` with the
    ``[B, T, K]`` float32 GEMM input rows of every listed layer. Returns the number of batches.
    With ``raw`` the callback gets the layer's input tensor itself (float32, its own shape; any
    module type) instead of GEMM rows: what an activation quantizer sees.

    With ``stop_early`` each forward pass ends as soon as every listed layer has seen its input
    (the rest of the model never runs; a layer called twice per forward is seen once).
    Under torch.distributed each rank runs its share of the batches (see
    :func:`knsparse.utils.distributed.shard`); callers add up their sums over the ranks.
    The model's training flag is restored afterwards and the hooks are always removed.
    Raises ``ValueError`` if ``calib`` yields no batch.
    """
    device = next(model.parameters()).device
    seen: set[str] = set()

    def hook_for(name: str, module: nn.Module):
        def hook(_mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            if stop_early and name in seen:
                return
            x = inputs[0].detach()
            on_rows(name, (x if raw else gemm_input_rows(module, x, conv_order)).float())
            seen.add(name)
            if stop_early and len(seen) == len(layers):
                raise _AllSeen

        return hook

    handles = [m.register_forward_pre_hook(hook_for(nm, m)) for nm, m in layers.items()]
    batches = 0
    try:
        with evaluation(model), torch.no_grad():
            inputs = distributed.shard(model_batches(calib))  # this rank's share of the batches
            for batch in tqdm(inputs, desc=desc, unit="batch", disable=not progress, leave=False):
                seen.clear()
                with contextlib.suppress(_AllSeen):
                    batch.to(device)(model)
                batches += 1
    finally:
        for h in handles:
            h.remove()
    return batches


@dataclass
class InputStats:
    """Accumulated GEMM-input statistics of one layer (float64 on the layer's device)."""

    samples: int
    """Calibration samples (batch entries) seen."""
    sum_sq: torch.Tensor
    """``[K]`` Σ over all rows of ``x_j²``."""
    block_gram: torch.Tensor | None
    """``[K/n, n, n]`` Σ over all rows of ``x_g x_gᵀ`` for each group ``g`` of ``n`` columns."""
    gram: torch.Tensor | None = None
    """``[K, K]`` Σ over all rows of ``x xᵀ`` (the full Gram ``XᵀX``), when collected."""
    rows: int = 0
    """GEMM input rows seen (tokens / conv output positions over all samples)."""

    def column_norms(self) -> torch.Tensor:
        """``‖x_j‖`` per sample: ``sqrt(Σ x_j² / samples)``, shape ``[K]`` float32."""
        return (self.sum_sq / max(self.samples, 1)).sqrt().float()

    def group_gram(self) -> torch.Tensor:
        """Block Gram per sample, ``[K/n, n, n]`` float32."""
        if self.block_gram is None:
            raise ValueError("these statistics were collected without block Gram matrices")
        return (self.block_gram / max(self.samples, 1)).float()

    def hessian(self, name: str) -> torch.Tensor:
        """Full Gram per sample, ``[K, K]`` float64: the layer-wise OBS Hessian up to a factor 2.

        Any number of rows: with fewer than ``K`` the Gram is singular and the methods damp it
        (:func:`knsparse.pruning.methods.obs.damped`); whether it carries enough for a re-fit of
        the kept weights is theirs to judge (:func:`knsparse.pruning.methods.obs.refit_too_thin`).
        ``ValueError`` naming layer ``name`` when it was not collected.
        """
        if self.gram is None:
            raise ValueError(f"layer {name!r}: statistics were collected without the full Gram matrix")
        return self.gram / max(self.samples, 1)


def all_reduce_stats(stats: Mapping[str, InputStats]) -> dict[str, InputStats]:
    """Every rank's statistics summed over the ranks (identity in one process): after it each
    rank holds the statistics of the whole calibration set."""
    if not distributed.active():
        return dict(stats)
    flat: dict[str, torch.Tensor] = {}
    for name, st in stats.items():
        counts = [st.samples, st.rows]
        flat[f"{name}\0counts"] = torch.tensor(counts, dtype=torch.float64, device=st.sum_sq.device)
        flat[f"{name}\0sum_sq"] = st.sum_sq
        for field_name in ("block_gram", "gram"):
            if getattr(st, field_name) is not None:
                flat[f"{name}\0{field_name}"] = getattr(st, field_name)
    summed = distributed.all_reduce_sum(flat)
    names = {key.split("\0")[0] for key in summed}
    out = {}
    for name in sorted(names):
        samples, rows = (int(v) for v in summed[f"{name}\0counts"].tolist())
        out[name] = InputStats(
            samples,
            summed[f"{name}\0sum_sq"],
            summed.get(f"{name}\0block_gram"),
            summed.get(f"{name}\0gram"),
            rows,
        )
    return out


def collect_input_stats(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable[object],
    *,
    group: int | None = None,
    full_gram: bool = False,
    conv_order: ConvOrder = "rsc",
    progress: bool = False,
    stop_early: bool = False,
) -> dict[str, InputStats]:
    """Column sums of squares of every layer's GEMM inputs, with ``group = n`` also the
    ``n × n`` Gram block of every group of ``n`` consecutive reduction columns (``K % n == 0``
    is required for those layers), with ``full_gram`` the whole ``K × K`` Gram (each batch's
    product in float32, accumulated in float64). Memory: ``K`` (+ ``K·n``, + ``K²``) float64 per
    layer; callers bound it by collecting a few layers per pass. ``stop_early`` as in
    :func:`stream_layer_inputs`.

    Raises ``ValueError`` naming the layer if its calibration inputs contain NaN or Inf.
    """
    stats: dict[str, InputStats] = {}

    def accumulate(name: str, rows: torch.Tensor) -> None:
        b, _, k = rows.shape
        flat = rows.reshape(-1, k)
        st = stats.get(name)
        if st is None:
            zeros = functools.partial(torch.zeros, dtype=torch.float64, device=rows.device)
            if group is not None and k % group:
                raise ValueError(f"layer {name!r}: reduction size {k} is not a multiple of n={group}")
            st = stats[name] = InputStats(
                0,
                zeros(k),
                zeros(k // group, group, group) if group is not None else None,
                zeros(k, k) if full_gram else None,
            )
        st.samples += b
        st.rows += flat.shape[0]
        block = full = None
        if st.block_gram is not None:
            g = flat.reshape(flat.shape[0], -1, group)
            block = torch.einsum("tgi,tgj->gij", g, g)
        if st.gram is not None:
            full = flat.T @ flat
        # The squares are a Gram's diagonal when one is collected. A NaN or Inf input shows in
        # them, so only a batch whose sums are not finite is scanned (one pass fewer per batch).
        if full is not None:
            sum_sq = full.diagonal()
        elif block is not None:
            sum_sq = block.diagonal(dim1=1, dim2=2).reshape(k)
        else:
            sum_sq = flat.square().sum(0)
        if not torch.isfinite(sum_sq).all():
            if not torch.isfinite(flat).all():
                raise ValueError(
                    f"layer {name!r}: calibration inputs contain NaN or Inf "
                    "(check the calibration batches and the layers before it)"
                )
            sum_sq = flat.double().square().sum(0)  # finite inputs whose float32 squares overflow
        st.sum_sq += sum_sq.double()
        if full is not None:
            st.gram.add_(full)  # float32 product into the float64 sum, no float64 temporary
        if block is not None:
            st.block_gram += block.double()

    stream_layer_inputs(
        model, layers, calib, accumulate, conv_order=conv_order, progress=progress, stop_early=stop_early
    )
    stats = all_reduce_stats(stats)
    missing = [nm for nm in layers if nm not in stats]
    if missing:
        raise ValueError(f"layers never ran during calibration (not on the forward path?): {missing}")
    return stats


def data_path_budgets(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    calib: Iterable[object],
    residuals: Mapping[str, torch.Tensor],
    *,
    lipschitz: Mapping[str, float] | None = None,
    conv_order: ConvOrder = "rsc",
    progress: bool = False,
) -> dict[str, float]:
    """``B_T(R) = (2/|T|) Σ_s L_s ‖R ψ(s)‖_∞`` per layer over the calibration samples ``s``.

    ``residuals[name]`` is the removed component ``R`` in reduction view ``[out, K]``; ``ψ(s)``
    is sample ``s``'s GEMM input (all its rows), so ``‖R ψ(s)‖_∞`` is the largest absolute
    output change over every output channel and token/position of that sample. ``L_s`` is
    ``lipschitz[name]`` (default 1) for every sample of that layer.
    """
    total = {nm: 0.0 for nm in residuals}
    count = {nm: 0 for nm in residuals}
    lipschitz = lipschitz or {}

    def accumulate(name: str, rows: torch.Tensor) -> None:
        change = rows @ residuals[name].to(rows.device, torch.float32).T  # [B, T, out]
        total[name] += float(change.abs().amax(dim=(1, 2)).double().sum())
        count[name] += rows.shape[0]

    stream_layer_inputs(
        model,
        {nm: layers[nm] for nm in residuals},
        calib,
        accumulate,
        conv_order=conv_order,
        progress=progress,
        desc="certificate",
    )
    total, count = distributed.all_reduce_floats(total), distributed.all_reduce_floats(count)
    return {nm: 2.0 * lipschitz.get(nm, 1.0) * total[nm] / max(count[nm], 1) for nm in residuals}
