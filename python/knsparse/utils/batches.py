"""Model calls from a calibration set: the one place that interprets a batch.

``calib`` is one batch or an iterable of batches (a list, a ``DataLoader``). A batch is

- a tensor ``x``: called as ``model(x)``;
- a mapping (Hugging Face style, e.g. ``{"pixel_values": x}``): called as ``model(**batch)``;
- a tuple/list ``(inputs, target, ...)`` (a labelled ``DataLoader``): its first element is the
  input, a tensor or a mapping as above; the rest is ignored.

A single tensor or a single mapping passed as ``calib`` is one batch.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn


@dataclass(frozen=True)
class Batch:
    """One model call: ``model(*args, **kwargs)``; ``index`` is its place in the calibration set."""

    args: tuple[torch.Tensor, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    index: int = 0
    label: str = ""
    """How errors name the batch (default ``calibration batch <index>``)."""

    def __call__(self, model: nn.Module, locate: bool = False) -> Any:
        """The model's output. A batch the model cannot run (wrong image size or channel count,
        labels instead of images, a wrong keyword) is a ``ValueError`` saying which batch, what
        it holds and what the model's first layer expects, instead of torch's error from deep
        inside a hook. With ``locate`` (a one-off check call: it hooks every module), the
        message also names the innermost layer that was running when the error was raised."""
        running: list[str] = []
        with _tracking(model, running) if locate else contextlib.nullcontext():
            try:
                return model(*self.args, **self.kwargs)
            except (RuntimeError, TypeError, IndexError, AssertionError) as exc:
                first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
                name = self.label or f"calibration batch {self.index}"
                where = ""
                if running:
                    layer = model.get_submodule(running[-1])
                    who = f"layer {running[-1]!r}" if running[-1] else "the model's own forward"
                    where = f"; {who} ({type(layer).__name__}) raised {type(exc).__name__}"
                raise ValueError(
                    f"{name} ({self.describe()}) does not fit the model{_expectation(model)}{where}: {first}"
                ) from exc

    def describe(self) -> str:
        """What the batch holds, e.g. ``tensor [64, 1, 8, 8] float32``."""
        parts = [_describe(v) for v in self.args] + [f"{k}={_describe(v)}" for k, v in self.kwargs.items()]
        text = ", ".join(parts)
        if any(not t.is_floating_point() for t in self.tensors()):
            text += "; integer values: labels instead of images?"
        return text

    def to(self, device: torch.device | None) -> Batch:
        """The batch with every tensor moved to ``device`` (itself when ``device`` is None)."""
        if device is None:
            return self

        def move(v: Any) -> Any:
            return v.to(device) if isinstance(v, torch.Tensor) else v

        return Batch(
            tuple(move(a) for a in self.args),
            {k: move(v) for k, v in self.kwargs.items()},
            self.index,
            self.label,
        )

    @property
    def size(self) -> int:
        """Samples in the batch: the leading dimension of its first tensor."""
        return int(next(iter(self.tensors())).shape[0])

    def tensors(self) -> Iterator[torch.Tensor]:
        """The batch's tensors, positional first."""
        for v in (*self.args, *self.kwargs.values()):
            if isinstance(v, torch.Tensor):
                yield v


def as_batch(batch: object, index: int = 0) -> Batch:
    """Interpret one batch (see the module docstring); ``TypeError`` naming ``index`` if it holds
    no input tensor."""
    item = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
    if isinstance(item, torch.Tensor):
        return Batch((item,), index=index)
    if isinstance(item, Mapping):
        if any(isinstance(v, torch.Tensor) for v in item.values()):
            return Batch(kwargs=dict(item), index=index)
        raise TypeError(f"calibration batch {index} is a mapping with no tensor (keys {list(item)[:5]})")
    raise TypeError(f"calibration batch {index} holds no tensor (got {type(item).__name__})")


def model_batches(calib: object, device: torch.device | None = None) -> Iterator[Batch]:
    """Yield every batch of ``calib`` as a :class:`Batch` (tensors moved to ``device`` if given);
    ``ValueError`` if there is none, ``TypeError`` if a batch holds no tensor."""
    batches = [calib] if isinstance(calib, (torch.Tensor, Mapping)) else calib
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(
            f"calib must be a tensor, a mapping or an iterable of batches, got {type(calib).__name__}"
        ) from None
    count = 0
    for raw in iterator:
        yield as_batch(raw, count).to(device)
        count += 1
    if count == 0:
        raise ValueError("the calibration set yielded no batches")


def output_tensors(output: object) -> list[torch.Tensor]:
    """The tensors of a model output: a tensor, a tuple/list, or a mapping such as a Hugging
    Face ``ModelOutput`` (its values in order, e.g. ``logits``)."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, Mapping):
        output = list(output.values())
    if isinstance(output, (tuple, list)):
        return [t for t in output if isinstance(t, torch.Tensor)]
    return []


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` if it has neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None


@contextlib.contextmanager
def _tracking(model: nn.Module, running: list[str]) -> Iterator[None]:
    """Keep ``running`` the stack of module names whose forward has started and not returned
    (after an exception, its last entry is the innermost layer that raised)."""

    def enter(name: str) -> Callable[..., None]:
        def hook(*_: object) -> None:
            running.append(name)

        return hook

    def leave(*_: object) -> None:
        running.pop()

    handles = []
    for name, module in model.named_modules():
        handles.append(module.register_forward_pre_hook(enter(name)))
        handles.append(module.register_forward_hook(leave))
    try:
        yield
    finally:
        for h in handles:
            h.remove()


def _describe(v: object) -> str:
    if isinstance(v, torch.Tensor):
        return f"tensor {list(v.shape)} {str(v.dtype).removeprefix('torch.')}"
    return type(v).__name__


def _expectation(model: nn.Module) -> str:
    """`` (its first layer NAME takes ...)`` for the first Conv2d / Linear of ``model``, else ``""``."""
    for name, m in model.named_modules():
        if isinstance(m, nn.Conv2d):
            return f" (its first layer {name!r} takes [B, {m.in_channels}, H, W] floating-point images)"
        if isinstance(m, nn.Linear):
            return f" (its first layer {name!r} takes [..., {m.in_features}] floating-point inputs)"
    return ""
