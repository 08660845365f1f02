"""Ragged matrices → padded, memory-bounded buckets for the batched NMF kernel.

Every layer contributes a *problem*: a stack of ``count`` matrices of one shape ``[m, n]`` (one
matrix for a whole-layer fit, one per output channel for a per-channel fit). Problems whose
shapes round up to the same ``[mp, np]`` share a bucket, so one kernel call fits many layers;
the padding is masked by the kernels (padded rows cost them nothing, so rows round up coarsely,
at most 12.5%, and columns to a multiple of 16). Without padding (``pad=False``: the C kernel fits
one matrix at a time and gains nothing from a common shape) only equal shapes share a bucket, and
no padding is filled, fitted or scored. A bucket is cut into chunks holding at most
``max_chunk_bytes`` of working memory, which bounds peak memory for any model size.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

PAD = 16  # bucket shapes are multiples of this
WORKING_COPIES = 3  # fp32 copies of a chunk alive at once: X, the scores and one scratch buffer


def round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def bucket_rows(m: int) -> int:
    """``m`` rounded up to a step of 1/8 of its leading power of two (at least ``PAD``)."""
    return round_up(m, max(PAD, (1 << (m.bit_length() - 1)) // 8))


@dataclass(frozen=True)
class Problem:
    """``count`` same-shape ``[m, n]`` matrices of layer ``name``, fitted at ``rank``; ``transposed``
    when they are the transposes of the layer's matrices (buckets never mix the two)."""

    name: str
    count: int
    m: int
    n: int
    rank: int
    device: torch.device
    transposed: bool = False


@dataclass(frozen=True)
class Piece:
    """Matrices ``start:stop`` of problem number ``problem``."""

    problem: int
    start: int
    stop: int


@dataclass
class Chunk:
    """One kernel call: the pieces of a bucket, padded to ``[mp, np]``."""

    mp: int
    np: int
    rank: int
    device: torch.device
    transposed: bool = False
    pieces: list[Piece] = field(default_factory=list)

    @property
    def batch(self) -> int:
        return sum(p.stop - p.start for p in self.pieces)

    @property
    def nbytes(self) -> int:
        """Working memory of the chunk (``WORKING_COPIES`` fp32 buckets)."""
        return WORKING_COPIES * 4 * self.batch * self.mp * self.np


def plan_chunks(problems: list[Problem], max_chunk_bytes: int, pad: bool = True) -> list[Chunk]:
    """Group problems into buckets (padded ones with ``pad``, of equal shapes without) and cut them
    into chunks of at most ``max_chunk_bytes``.

    A single matrix larger than the budget gets a chunk of its own (the smallest unit). Every
    matrix of every problem lands in exactly one chunk; chunks come bucket by bucket in the order
    the buckets first appear.
    """
    if max_chunk_bytes <= 0:
        raise ValueError(f"max_chunk_bytes must be positive, got {max_chunk_bytes}")
    buckets: dict[tuple, list[int]] = {}
    for i, p in enumerate(problems):
        shape = (bucket_rows(p.m), round_up(p.n, PAD)) if pad else (p.m, p.n)
        key = (p.rank, str(p.device), p.transposed, *shape)
        buckets.setdefault(key, []).append(i)
    chunks: list[Chunk] = []
    for (rank, _, transposed, mp, np_), members in buckets.items():
        per_matrix = WORKING_COPIES * 4 * mp * np_
        cap = max(1, max_chunk_bytes // per_matrix)
        chunk = Chunk(mp, np_, rank, problems[members[0]].device, transposed)
        for i in members:
            start = 0
            while start < problems[i].count:
                if chunk.batch == cap:
                    chunks.append(chunk)
                    chunk = Chunk(mp, np_, rank, chunk.device, transposed)
                stop = min(problems[i].count, start + cap - chunk.batch)
                chunk.pieces.append(Piece(i, start, stop))
                start = stop
        chunks.append(chunk)
    return chunks
