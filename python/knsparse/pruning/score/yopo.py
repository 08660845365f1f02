"""YOPO ("You Only Prune Once") low-rank residual saliency.

For a layer with weight ``W``, take ``X = |W|`` in its reduction view ``[out, in*kh*kw]`` (conv
weights in (R, S, C) order by default, the grouping of :func:`knsparse.core.masks.nm_mask`), fit a
rank-``r`` NMF ``X ≈ V H`` by multiplicative updates and score every weight by ``|X - V H|``. A
weight the low-rank structure does not explain is distinctive and is kept. No data, no gradients:
it works at initialisation as well as on trained weights, and since any sparsity is a
re-threshold of the same scores, masks at different budgets are nested.

All layers are fitted together: shapes are bucketed (:mod:`.buckets`) and each bucket is one call
of the batched NMF kernel (Triton on CUDA, a C kernel on CPU), then one call of the fused
residual kernel. On CPU the buckets hold equal shapes only (no padding), are cut small enough to
balance the threads, and each thread also takes its layers' medians and writes the scores over its
bucket, so a single call touches about one model-sized buffer beyond the weights.
"""

from __future__ import annotations

import contextlib
import zlib
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from tqdm.auto import tqdm

from knsparse.core.checks import check_flag, check_number
from knsparse.core.masks import check_groupable, from_reduction_view, to_reduction_view
from knsparse.core.pattern import ConvOrder, Pattern, check_conv_order
from knsparse.kernels import nmf_cpu
from knsparse.kernels.nmf import nmf_init, nmf_mu
from knsparse.kernels.residual import residual_nm_mask, residual_scores

from .buckets import WORKING_COPIES, Chunk, Problem, plan_chunks
from .layers import ModelOrWeights, prunable_weights

DEFAULT_MAX_CHUNK_BYTES = 512 * 2**20
# What a chunk's fit turns into (scores or a mask), as a padded bucket: (X, V, H, sizes, chunk) -> tensor.
Emit = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Chunk], torch.Tensor]


def _layer_seed(seed: int, name: str) -> int:
    """A per-layer seed, so a layer's fit does not depend on which other layers are scored."""
    return (zlib.crc32(name.encode()) + seed * 0x9E3779B97F4A7C15) % 2**63


def _median_abs(w: torch.Tensor) -> float:
    """Exact lower median of ``|w|`` (``torch.median``'s convention).

    On CPU by numpy's introselect on one copy of ``|w|`` (numpy's, which on CPU costs a fraction
    of a fresh torch tensor of the same size). Elsewhere by a two-level radix select: the int32 bit
    patterns of non-negative floats sort like their values: a histogram of the top 16 bits finds
    the bucket holding the median, a histogram of the low 16 bits inside that bucket finds the
    value. Linear passes only, several times faster than ``median`` on large layers.
    """
    k = (w.numel() - 1) // 2
    if w.device.type == "cpu":
        values = np.abs(w.detach().float().numpy().reshape(-1))  # a fresh copy: free to reorder
        values.partition(k)
        return float(values[k])
    bits = w.detach().abs().float().flatten().view(torch.int32)
    top = bits >> 16
    counts = torch.bincount(top, minlength=1 << 15)
    cum = counts.cumsum(0)
    bucket = int(torch.searchsorted(cum, torch.tensor(k, device=cum.device), right=True))
    k -= int(cum[bucket] - counts[bucket])
    low = torch.where(top == bucket, bits & 0xFFFF, 1 << 16)
    low_cum = torch.bincount(low, minlength=(1 << 16) + 1)[: 1 << 16].cumsum(0)
    low_bits = int(torch.searchsorted(low_cum, torch.tensor(k, device=cum.device), right=True))
    return float(torch.tensor([(bucket << 16) | low_bits], dtype=torch.int32).view(torch.float32))


def _median_scale(w: torch.Tensor) -> float:
    """median(|W|), falling back to mean(|W|) and then to 1 for (nearly) all-zero weights."""
    median = _median_abs(w)
    if median > 0:
        return median
    mean = float(w.detach().abs().float().mean())
    return mean if mean > 0 else 1.0


def _native_cpu(problems: list[Problem], iters: int) -> bool:
    """All problems on CPU, fitted by the C kernel."""
    ranks = {p.rank for p in problems}
    on_cpu = all(p.device.type == "cpu" for p in problems)
    return on_cpu and iters > 0 and all(nmf_cpu.native_available(r) for r in ranks)


def _chunk_workers(problems: list[Problem], iters: int) -> int:
    """Kernel calls to run at once: on CPU with the C kernel, one per thread, each call on one
    thread (whole buckets balance better than slices of one bucket); elsewhere one."""
    return max(1, torch.get_num_threads()) if _native_cpu(problems, iters) else 1


@contextlib.contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op threads set to one for the block (threads started inside it keep one). With
    one worker per core the workers' torch ops (fills, initial factors) must not start OpenMP teams
    of their own: those would compete with the other workers, and their spin-waiting threads burn a
    core after every op."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def _per_channel(w: torch.Tensor, per_channel: bool) -> bool:
    # A rank-1 fit of a vector (a Linear row, a 1x1 kernel) is exact and leaves no residual, so
    # those layers keep the whole-layer fit even when per_channel is asked for.
    return per_channel and w.dim() == 4 and w.shape[2] * w.shape[3] > 1


def _oriented(x: torch.Tensor, transposed: bool) -> torch.Tensor:
    return x.transpose(-1, -2) if transposed else x


def _reorder(t: torch.Tensor, dim: int, shape: torch.Size, src: ConvOrder, dst: ConvOrder) -> torch.Tensor:
    """``t`` with its axis ``dim``, the reduction axis of a weight of ``shape`` in ``src`` order,
    reordered to ``dst`` order (unchanged for 2-D weights or equal orders)."""
    if len(shape) != 4 or src == dst:
        return t
    index = torch.arange(t.shape[dim], device=t.device)[None]
    perm = to_reduction_view(from_reduction_view(index, (1, *shape[1:]), src), dst)[0]
    return t.index_select(dim, perm)


def _fill(
    dst: torch.Tensor,
    w: torch.Tensor,
    channelwise: bool,
    transposed: bool,
    layout: ConvOrder,
    start: int,
    scale: float,
) -> None:
    """Write matrices ``start:start+len(dst)`` of a layer's problem, ``|W| / scale`` in the problem's
    orientation, into ``dst``."""
    if channelwise:
        part = w[start : start + dst.shape[0]]
        src = _oriented(part.reshape(part.shape[0], part.shape[1], -1), transposed)
    else:
        src = _oriented(to_reduction_view(w, layout), transposed)[None]
    torch.abs(src, out=dst).div_(scale)


class LayerFits:
    """The problems of one scoring run and the machinery to fit them chunk by chunk (also used by
    ``bench/bench_yopo.py`` to time the kernels on exactly the buckets ``yopo`` builds).

    Whole-layer fits use the ``conv_order`` reduction view of conv weights; ``layout`` is the order
    the matrices are laid out in for the kernels (default ``conv_order``). A column permutation of
    ``X`` permutes the columns of ``H`` and nothing else in the multiplicative updates, so with the
    initial factors reordered alike the fit in ``layout`` is the ``conv_order`` fit up to rounding,
    its residual reordered: ``yopo`` fits in "crs" order, a plain reshape of the weight, which saves
    a permuted copy on the way in and another on the way out.
    """

    def __init__(
        self,
        weights: dict[str, torch.Tensor],
        rank: int,
        per_channel: bool,
        normalize: bool,
        seed: int,
        conv_order: ConvOrder,
        layout: ConvOrder | None = None,
    ) -> None:
        if rank < 1:
            raise ValueError(f"rank must be at least 1, got {rank}")
        self.weights = weights
        self.seed = seed
        self.conv_order = conv_order
        self.layout = conv_order if layout is None else layout
        self.normalize = normalize
        self.problems: list[Problem] = []
        self.channelwise: list[bool] = []
        for name, w in weights.items():
            cw = _per_channel(w, per_channel)
            count, m, n = (
                (w.shape[0], w.shape[1], w.shape[2] * w.shape[3])
                if cw
                else (1, *w.reshape(w.shape[0], -1).shape)
            )
            # Fit every matrix in its wide orientation (X^T when X is tall): the same factorisation,
            # and the per-row work of the kernels is spread over longer rows.
            tall = m > n
            self.problems.append(
                Problem(name, count, *((n, m) if tall else (m, n)), 1 if cw else rank, w.device, tall)
            )
            self.channelwise.append(cw)
        self._scales: dict[int, float] = {}
        self._inits: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def scale(self, i: int) -> float:
        """The divisor of problem ``i``'s layer: its median ``|w|`` (1 without ``normalize``), taken
        at first use, so the threads fitting the chunks take the medians of their own layers."""
        if i not in self._scales:  # racing threads compute the same value
            w = self.weights[self.problems[i].name]
            self._scales[i] = _median_scale(w) if self.normalize else 1.0
        return self._scales[i]

    def fill(self, i: int, start: int, dst: torch.Tensor) -> None:
        p = self.problems[i]
        _fill(
            dst,
            self.weights[p.name],
            self.channelwise[i],
            p.transposed,
            self.layout,
            start,
            self.scale(i),
        )

    def init(self, i: int, x: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial factors of a whole problem, drawn from the layer's own seed. ``x`` is the problem's
        full stack of matrices when the caller has it; otherwise it is rebuilt (and the draw kept
        until the problem's last piece is used)."""
        if i in self._inits:
            return self._inits[i]
        p = self.problems[i]
        gen = torch.Generator().manual_seed(_layer_seed(self.seed, p.name))
        if x is None:
            x = torch.empty(p.count, p.m, p.n, device=p.device)
            self.fill(i, 0, x)
            self._inits[i] = self._laid_out(i, nmf_init(x, p.rank, gen))
            return self._inits[i]
        return self._laid_out(i, nmf_init(x, p.rank, gen))

    def _laid_out(
        self, i: int, factors: tuple[torch.Tensor, torch.Tensor]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Initial factors drawn in ``conv_order`` reordered to ``layout`` (the reduction axis is the
        columns of ``H``, or the rows of ``V`` for a transposed problem)."""
        if self.channelwise[i]:
            return factors
        p = self.problems[i]
        shape = self.weights[p.name].shape
        v, h = factors
        if p.transposed:
            return _reorder(v, 1, shape, self.conv_order, self.layout), h
        return v, _reorder(h, 2, shape, self.conv_order, self.layout)

    def inputs(self, chunk: Chunk) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """The padded bucket ``(X, V0, H0, sizes)`` of one chunk, on the chunk's device."""
        b, mp, np_, r, dev = chunk.batch, chunk.mp, chunk.np, chunk.rank, chunk.device
        padded = any(
            (self.problems[p.problem].m, self.problems[p.problem].n) != (mp, np_) for p in chunk.pieces
        )
        x = (torch.zeros if padded else torch.empty)(b, mp, np_, device=dev)
        v0 = torch.zeros(b, mp, r, device=dev)
        h0 = torch.zeros(b, r, np_, device=dev)
        sizes = torch.empty(b, 2, dtype=torch.int32)
        row = 0
        for piece in chunk.pieces:
            p, k = self.problems[piece.problem], piece.stop - piece.start
            dst = x[row : row + k, : p.m, : p.n]
            self.fill(piece.problem, piece.start, dst)
            whole = piece.start == 0 and piece.stop == p.count
            v_all, h_all = self.init(piece.problem, dst if whole else None)
            v0[row : row + k, : p.m] = v_all[piece.start : piece.stop]
            h0[row : row + k, :, : p.n] = h_all[piece.start : piece.stop]
            sizes[row : row + k] = torch.tensor([p.m, p.n], dtype=torch.int32)
            row += k
            if piece.stop == p.count:
                self._inits.pop(piece.problem, None)
        return x, v0, h0, sizes.to(dev)

    def run(
        self,
        chunk: Chunk,
        iters: int,
        emit: Emit,
    ) -> Iterable[tuple[int, int, int, torch.Tensor]]:
        """Fit one chunk; yields ``(problem, start, stop, emit(...)[rows, :m, :n])`` per piece."""
        x, v0, h0, sizes = self.inputs(chunk)
        v, h = nmf_mu(x, v0, h0, sizes, iters)
        out = emit(x, v, h, sizes, chunk)
        row = 0
        for piece in chunk.pieces:
            p, k = self.problems[piece.problem], piece.stop - piece.start
            yield piece.problem, piece.start, piece.stop, out[row : row + k, : p.m, : p.n]
            row += k

    def chunks(self, iters: int, max_chunk_bytes: int, workers: int) -> list[Chunk]:
        """The kernel calls of this run, largest first. With the C kernel the buckets are unpadded
        and no chunk holds more than 1/(4 workers) of the work (one matrix at least), so the
        threads finish together; the memory budget is shared between the calls in flight."""
        budget = max(1, max_chunk_bytes // workers)
        native = _native_cpu(self.problems, iters)
        if native and workers > 1:
            total = sum(WORKING_COPIES * 4 * p.count * p.m * p.n for p in self.problems)
            budget = min(budget, max(1, total // (4 * workers)))
        chunks = plan_chunks(self.problems, budget, pad=not native)
        chunks.sort(key=lambda c: -c.batch * c.mp * c.np)
        return chunks

    def assemble(
        self,
        iters: int,
        max_chunk_bytes: int,
        emit: Emit,
        dtype: torch.dtype,
        progress: bool,
    ) -> dict[str, torch.Tensor]:
        """Run every chunk and put each layer's results back into its weight's shape."""
        # Per-channel layers arrive in slices and are written into place; whole layers arrive at once.
        out = {
            p.name: torch.empty(self.weights[p.name].shape, dtype=dtype, device=p.device)
            for p, cw in zip(self.problems, self.channelwise, strict=True)
            if cw
        }
        if max_chunk_bytes <= 0:
            raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
        workers = _chunk_workers(self.problems, iters)
        chunks = self.chunks(iters, max_chunk_bytes, workers)

        def fit(chunk: Chunk) -> None:
            """Fit a chunk and put its results in place (disjoint entries of ``out`` per chunk)."""
            with nmf_cpu.serial():
                for i, start, stop, part in self.run(chunk, iters, emit):
                    name = self.problems[i].name
                    part = _oriented(part, self.problems[i].transposed)
                    if self.channelwise[i]:
                        out[name][start:stop] = part.reshape(out[name][start:stop].shape)
                    else:
                        out[name] = from_reduction_view(part[0], self.weights[name].shape, self.layout)

        with (
            _one_intra_op_thread() if workers > 1 else contextlib.nullcontext(),
            ThreadPoolExecutor(workers) as pool,
        ):
            results = pool.map(fit, chunks) if workers > 1 else map(fit, chunks)
            if progress:  # a disabled bar still costs a fresh process a few ms (its lock)
                results = tqdm(results, total=len(chunks), desc="yopo", unit="bucket")
            for _ in results:
                pass
        return {name: out[name] for name in self.weights}


def _check_fit_args(rank: int, iters: int, seed: int, max_chunk_bytes: int, conv_order: str) -> None:
    check_number(rank, "rank", low=1, integer=True)
    check_number(iters, "iters", low=1, integer=True)
    check_number(seed, "seed", integer=True)
    check_number(max_chunk_bytes, "max_chunk_bytes", low=1, integer=True)
    check_conv_order(conv_order)


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
        max_chunk_bytes: working memory of the kernel calls in flight (on CPU one call per
            thread, each with an equal share); a bucket larger than its share is fitted in several
            calls, so peak memory is about this much plus the returned scores whatever the
            model's size (a single matrix larger than the share still gets one call).
        progress: show a tqdm bar over the kernel calls.

    Raises:
        ValueError: naming the layer, for NaN / Inf weights or a weight that is not 2-D / 4-D.

    All-zero rows, columns or layers get finite (zero) scores.
    """
    _check_fit_args(rank, iters, seed, max_chunk_bytes, conv_order)
    check_flag(per_channel, "per_channel")
    check_flag(normalize, "normalize")
    weights = prunable_weights(model_or_weights, layers)
    # Scores are elementwise, so the fit's column order is free: "crs" is a reshape of the weight.
    fit = LayerFits(weights, rank, per_channel, normalize, seed, conv_order, layout="crs")

    def emit(
        x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, chunk: Chunk
    ) -> torch.Tensor:
        return residual_scores(x, v, h, sizes, in_place=True)  # X is the chunk's own copy

    return fit.assemble(iters, max_chunk_bytes, emit, torch.float32, progress)


def yopo_nm_masks(
    model_or_weights: ModelOrWeights,
    pattern: str | Pattern = "2:4",
    rank: int = 7,
    iters: int = 200,
    normalize: bool = True,
    seed: int = 0,
    layers: Iterable[str] | None = None,
    conv_order: ConvOrder | None = None,
    max_chunk_bytes: int = DEFAULT_MAX_CHUNK_BYTES,
    progress: bool = False,
) -> dict[str, torch.Tensor]:
    """YOPO k:n masks ``{name: bool mask}`` straight from the fused residual + group top-k kernel.

    Equal to ``nm_mask(yopo(...)[name], pattern, conv_order)`` for every layer (whole-layer fits;
    the groups run along the reduction axis, which per-channel slices do not). Raises
    ``ValueError`` naming the layer when the pattern cannot tile its reduction axis.
    """
    pattern = Pattern.parse(pattern, conv_order)
    _check_fit_args(rank, iters, seed, max_chunk_bytes, pattern.conv_order)
    weights = prunable_weights(model_or_weights, layers)
    for name, w in weights.items():
        check_groupable(w.shape, pattern, name)
    fit = LayerFits(weights, rank, False, normalize, seed, pattern.conv_order)

    def emit(
        x: torch.Tensor, v: torch.Tensor, h: torch.Tensor, sizes: torch.Tensor, chunk: Chunk
    ) -> torch.Tensor:
        # Transposed matrices hold the reduction axis on their rows: group along rows there.
        return residual_nm_mask(x, v, h, sizes, pattern, along_rows=chunk.transposed)[1]

    return fit.assemble(iters, max_chunk_bytes, emit, torch.bool, progress)
