"""torch.distributed for every stage: set-up under torchrun, rank helpers and the reductions
that make N processes compute what one process computes.

A command started with ``torchrun --nproc-per-node N --no-python knsparse ...`` (or ``--nnodes M``)
gets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous address from torchrun;
:func:`init` joins the process group (gloo on CPU, NCCL on CUDA) with a timeout, so a rank
that dies makes the others fail with an error instead of waiting for ever.

The stages split their calibration batches with :func:`shard` (batch ``i`` goes to rank
``i mod N``), accumulate sums on their share and add them up with :func:`all_reduce_sum`:
every rank then holds the statistics of the whole calibration set, and the masks and repaired
weights are those of a one-process run (float64 sums, equal up to the order of the additions).
Without a process group every helper is the identity.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from datetime import timedelta
from typing import TypeVar

import torch
import torch.distributed as dist

T = TypeVar("T")

TIMEOUT_ENV = "KNSPARSE_DIST_TIMEOUT"
"""Seconds a collective may wait for the other ranks before failing (default 1800)."""
DEFAULT_TIMEOUT_S = 1800.0


def launched() -> bool:
    """True inside a process started by torchrun (``RANK`` and ``WORLD_SIZE`` set)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def timeout_s() -> float:
    """The collective timeout in seconds: ``$KNSPARSE_DIST_TIMEOUT`` or 1800."""
    text = os.environ.get(TIMEOUT_ENV)
    if text is None:
        return DEFAULT_TIMEOUT_S
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"{TIMEOUT_ENV} must be a number of seconds, got {text!r}") from None
    if value <= 0:
        raise ValueError(f"{TIMEOUT_ENV} must be > 0 seconds, got {value}")
    return value


def init(backend: str | None = None) -> bool:
    """Join torchrun's process group if this process was started by torchrun.

    ``backend`` defaults to ``"nccl"`` when CUDA is available (each process then uses GPU
    ``LOCAL_RANK``) and ``"gloo"`` otherwise. Returns whether a process group is active; a
    second call is a no-op.
    """
    if dist.is_initialized():
        return True
    if not launched():
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    if backend == "nccl":
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s()))
    return True


def shutdown() -> None:
    """Leave the process group (if any)."""
    if dist.is_initialized():
        dist.destroy_process_group()


def active() -> bool:
    """True when a process group is active (also with one rank: the collectives then run
    through the backend all the same)."""
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    """Number of processes (1 without a process group)."""
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def is_main() -> bool:
    """True on rank 0, the rank that writes files and prints."""
    return rank() == 0


def device() -> torch.device:
    """The device this rank computes on: its GPU ``LOCAL_RANK`` with CUDA, else the CPU."""
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def barrier() -> None:
    """Wait for every rank (no-op without a process group)."""
    if active():
        dist.barrier()


@contextmanager
def main_first() -> Iterator[None]:
    """Run the block on rank 0 first, then on the other ranks: rank 0 fills a cache (trains a
    model, writes a file) that the others then read."""
    if not is_main():
        barrier()
    yield
    if is_main():
        barrier()


def shard(items: Iterable[T]) -> Iterator[T]:
    """This rank's share of ``items``: item ``i`` goes to rank ``i mod world_size``."""
    r, n = rank(), world_size()
    for i, item in enumerate(items):
        if i % n == r:
            yield item


def _comm_device() -> torch.device:
    """Where collectives run: this rank's GPU under NCCL, the CPU under gloo."""
    return device() if dist.get_backend() == "nccl" else torch.device("cpu")


def all_reduce_sum(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum named tensors over all ranks; every rank gets the sums.

    A name that some ranks lack (a rank whose share of batches never reached a layer) counts
    as zeros of the shape and dtype the other ranks report. Shapes or dtypes that differ
    between ranks raise ``ValueError`` naming the tensor. Without a process group the input
    is returned as a dict.
    """
    return _all_reduce(tensors, "sum")


def all_reduce_max(tensors: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Element-wise maximum of named tensors over all ranks, as :func:`all_reduce_sum` (a name a
    rank lacks counts as zeros: meant for non-negative statistics such as an ``abs().amax()``)."""
    return _all_reduce(tensors, "max")


def _all_reduce(tensors: Mapping[str, torch.Tensor], op: str) -> dict[str, torch.Tensor]:
    if not active():
        return dict(tensors)
    layouts: list[dict[str, tuple[tuple[int, ...], str]] | None] = [None] * world_size()
    dist.all_gather_object(layouts, {k: (tuple(v.shape), str(v.dtype)) for k, v in tensors.items()})
    union: dict[str, tuple[tuple[int, ...], str]] = {}
    for layout in layouts:
        for name, spec in (layout or {}).items():
            if union.setdefault(name, spec) != spec:
                raise ValueError(
                    f"tensor {name!r} differs between ranks: {union[name]} vs {spec} (shape, dtype)"
                )
    comm = _comm_device()
    out = {}
    for name in sorted(union):
        shape, dtype = union[name]
        local = tensors.get(name)
        if local is None:
            buf = torch.zeros(shape, dtype=getattr(torch, dtype.removeprefix("torch.")), device=comm)
        else:
            buf = local.to(comm, copy=True)
        dist.all_reduce(buf, op=dist.ReduceOp.SUM if op == "sum" else dist.ReduceOp.MAX)
        out[name] = buf if local is None else buf.to(local.device)
    return out


def all_reduce_floats(values: Mapping[str, float]) -> dict[str, float]:
    """Sum named Python numbers over all ranks (float64)."""
    if not active():
        return dict(values)
    summed = all_reduce_sum({k: torch.tensor([float(v)], dtype=torch.float64) for k, v in values.items()})
    return {k: float(v) for k, v in summed.items()}


def all_gather_object(obj: T) -> list[T]:
    """Every rank's ``obj``, in rank order, on every rank (pickled; for small results)."""
    if not active():
        return [obj]
    out: list[T | None] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out  # type: ignore[return-value]


def broadcast_object(obj: T, src: int = 0) -> T:
    """Rank ``src``'s ``obj`` on every rank (pickled; for small results such as permutations)."""
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
