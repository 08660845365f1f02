"""YOPO ("You Only Prune Once") low-rank residual saliency.

For a layer with weight ``W``, take ``X = |W|`` in its reduction view ``[out, in*kh*kw]`` (conv
weights in (R, S, C) order by default, the grouping of :func:`knsparse.masks.nm_mask`), fit a
rank-``r`` NMF ``X ≈ V H`` by multiplicative updates and score every weight by ``|X - V H|``. A
weight the low-rank structure does not explain is distinctive and is kept. No data, no gradients:
it works at initialisation as well as on trained weights, and since any sparsity is a
re-threshold of the same scores, masks at different budgets are nested.

All layers are fitted together: shapes are bucketed (:mod:`.buckets`) and each bucket is one call
of the batched NMF kernel (Triton on CUDA, a C kernel on CPU), then one call of the fused
residual kernel.
"""

from __future__ import annotations

import zlib
from collections.abc import Callable, Iterable

import torch
from tqdm.auto import tqdm

from knsparse.kernels.nmf import nmf_init, nmf_mu
from knsparse.kernels.residual import residual_nm_mask, residual_scores
from knsparse.masks import ConvOrder, check_groupable, from_reduction_view, to_reduction_view
from knsparse.pattern import Pattern

from .buckets import Chunk, Problem, plan_chunks
from .layers import ModelOrWeights, prunable_weights

DEFAULT_MAX_CHUNK_BYTES = 512 * 2**20


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, so a layer's fit does not depend on which other layers are scored."""
    return (zlib.crc32(name.encode()) + seed * 0x9E3779B97F4A7C15) % 2**63


def _median_scale(w: torch.Tensor) -> float:
    """median(|W|), falling back to mean(|W|) and then to 1 for (nearly) all-zero weights."""
    a = w.detach().abs().float().flatten()
    for stat in (a.median(), a.mean()):
        value = float(stat)
        if value > 0:
            return value
    return 1.0


def _per_channel(w: torch.Tensor, per_channel: bool) -> bool:
    # A rank-1 fit of a vector (a Linear row, a 1x1 kernel) is exact and leaves no residual, so
    # those layers keep the whole-layer fit even when per_channel is asked for.
    return per_channel and w.dim() == 4 and w.shape[2] * w.shape[3] > 1


def _matrices(
    w: torch.Tensor, channelwise: bool, conv_order: ConvOrder, start: int, stop: int, scale: float
) -> torch.Tensor:
    """Matrices ``start:stop`` of a layer's problem as ``[k, m, n]`` float32, divided by ``scale``."""
    if channelwise:
        part = w[start:stop]
        return part.abs().float().reshape(part.shape[0], part.shape[1], -1) / scale
    return (to_reduction_view(w, conv_order).abs().float() / scale)[None]


class _Fit:
    """The problems of one scoring run and the machinery to fit them chunk by chunk."""

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        rank: int,
        per_channel: bool,
        normalize: bool,
        seed: int,
        conv_order: ConvOrder,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.weights = weights
        self.seed = seed
        self.conv_order = conv_order
        self.problems: list[Problem] = []
        self.channelwise: list[bool] = []
        self.scales: list[float] = []
        for name, w in weights.items():
            cw = _per_channel(w, per_channel)
            if cw:
                problem = Problem(name, w.shape[0], w.shape[1], w.shape[2] * w.shape[3], 1, w.device)
            else:
                m, n = to_reduction_view(w, conv_order).shape
                problem = Problem(name, 1, m, n, rank, w.device)
            self.problems.append(problem)
            self.channelwise.append(cw)
            self.scales.append(_median_scale(w) if normalize else 1.0)
        self._inits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def matrices(self, i: int, start: int, stop: int) -> torch.Tensor:
        p = self.problems[i]
        return _matrices(
            self.weights[p.name], self.channelwise[i], self.conv_order, start, stop, self.scales[i]
        )

    def init(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial factors of a whole problem, drawn once from the layer's own seed."""
        if i not in self._inits:
            p = self.problems[i]
            gen = torch.Generator().manual_seed(_layer_seed(self.seed, p.name))
            self._inits[i] = nmf_init(self.matrices(i, 0, p.count), p.rank, gen)
        return self._inits[i]

    def run(
        self,
        chunk: Chunk,
        iters: int,
        emit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
    ) -> Iterable[tuple[int, int, int, torch.Tensor]]:
        """Fit one chunk; yields ``(problem, start, stop, emit(...)[rows, :m, :n])`` per piece."""
        b, mp, np_, r, dev = chunk.batch, chunk.mp, chunk.np, chunk.rank, chunk.device
        x = torch.zeros(b, mp, np_, device=dev)
        v0 = torch.zeros(b, mp, r, device=dev)
        h0 = torch.zeros(b, r, np_, device=dev)
        sizes = torch.empty(b, 2, dtype=torch.int32)
        row = 0
        for piece in chunk.pieces:
            p, k = self.problems[piece.problem], piece.stop - piece.start
            x[row : row + k, : p.m, : p.n] = self.matrices(piece.problem, piece.start, piece.stop)
            v_all, h_all = self.init(piece.problem)
            v0[row : row + k, : p.m] = v_all[piece.start : piece.stop]
            h0[row : row + k, :, : p.n] = h_all[piece.start : piece.stop]
            sizes[row : row + k] = torch.tensor([p.m, p.n], dtype=torch.int32)
            row += k
            if piece.stop == p.count:
                self._inits.pop(piece.problem, None)
        sizes = sizes.to(dev)
        v, h = nmf_mu(x, v0, h0, sizes, iters)
        out = emit(x, v, h, sizes)
        row = 0
        for piece in chunk.pieces:
            p, k = self.problems[piece.problem], piece.stop - piece.start
            yield piece.problem, piece.start, piece.stop, out[row : row + k, : p.m, : p.n]
            row += k

    def assemble(
        self,
        iters: int,
        max_chunk_bytes: int,
        emit: Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor],
        dtype: torch.dtype,
        progress: bool,
    ) -> dict[str, torch.Tensor]:
        """Run every chunk and put each layer's results back into its weight's shape."""
        out = {name: torch.empty(w.shape, dtype=dtype, device=w.device) for name, w in self.weights.items()}
        chunks = plan_chunks(self.problems, max_chunk_bytes)
        for chunk in tqdm(chunks, desc="yopo", unit="bucket", disable=not progress):
            for i, start, stop, part in self.run(chunk, iters, emit):
                name = self.problems[i].name
                if self.channelwise[i]:
                    out[name][start:stop] = part.reshape(out[name][start:stop].shape)
                else:
                    out[name] = from_reduction_view(part[0], out[name].shape, self.conv_order)
        return out


def yopo(
    model_or_weights: ModelOrWeights,
    rank: int = 7,
    iters: int = 200,
    per_channel: bool = False,
    normalize: bool = True,
    seed: int = 0,
    layers: Iterable[str] | None = None,
    conv_order: ConvOrder = "rsc",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """YOPO saliency of every Linear / Conv2d weight: ``{name: scores}``, float32, weight-shaped.

    Args:
        model_or_weights: a model, or ``{name: weight}`` with 2-D / 4-D weights.
        rank: NMF rank of the whole-layer fit.
        iters: multiplicative-update iterations.
        per_channel: fit every output channel of a k x k convolution on its own, as a rank-1 NMF
            of its ``[Cin, kh*kw]`` kernel (one batch of ``Cout`` matrices per layer). Linear and
            1x1 layers keep the whole-layer rank-``rank`` fit: a rank-1 fit of a vector is exact.
        normalize: divide each layer by its median ``|w|`` first, so scores are in units of the
            layer's median weight and comparable across layers (global thresholds).
        seed: seeds the initial factors; each layer draws from its own seed (``seed`` and its name).
        layers: only these layer names.
        conv_order: reduction-view order of conv weights for the whole-layer fit.
        max_chunk_bytes: working memory of one kernel call; a bucket larger than this is fitted in
            several calls, so peak memory is about this much plus the returned scores whatever
            the model's size (a single matrix larger than the budget still gets one call).
        progress: show a tqdm bar over the kernel calls.

    Raises:
        ValueError: naming the layer, for NaN / Inf weights or a weight that is not 2-D / 4-D.

    All-zero rows, columns or layers get finite (zero) scores.
    """
    weights = prunable_weights(model_or_weights, layers)
    fit = _Fit(weights, rank, per_channel, normalize, seed, conv_order)
    return fit.assemble(iters, max_chunk_bytes, residual_scores, torch.float32, progress)


def yopo_nm_masks(
    model_or_weights: ModelOrWeights,
    pattern: str | Pattern = "2:4",
    rank: int = 7,
    iters: int = 200,
    normalize: bool = True,
    seed: int = 0,
    layers: Iterable[str] | None = None,
    conv_order: ConvOrder = "rsc",
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """YOPO k:n masks ``{name: bool mask}`` straight from the fused residual + group top-k kernel.

    Equal to ``nm_mask(yopo(...)[name], pattern, conv_order)`` for every layer (whole-layer fits;
    the groups run along the reduction axis, which per-channel slices do not). Raises
    ``ValueError`` naming the layer when the pattern cannot tile its reduction axis.
    """
    pattern = Pattern.parse(pattern)
    if pattern.is_unstructured:
        raise ValueError("yopo_nm_masks needs a k:n pattern; threshold yopo() scores for unstructured masks")
    weights = prunable_weights(model_or_weights, layers)
    for name, w in weights.items():
        check_groupable(w.shape, pattern, conv_order, name)
    fit = _Fit(weights, rank, False, normalize, seed, conv_order)

    def emit(x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor) -> torch.Tensor:
        return residual_nm_mask(x, v, h, sizes, pattern)[1]

    return fit.assemble(iters, max_chunk_bytes, emit, torch.bool, progress)
