"""Model inputs from a calibration set.

``calib`` is a tensor (one batch), or an iterable of batches (a list, a DataLoader); a batch
is the model input or a tuple/list whose first element is.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn


def input_batches(calib: object, device: torch.device | None = None) -> Iterator[torch.Tensor]:
    """Yield the input tensor of every batch (moved to ``device`` if given); ``ValueError`` if
    there is none, ``TypeError`` if a batch holds no tensor."""
    batches = [calib] if isinstance(calib, torch.Tensor) else calib
    try:
        iterator = iter(batches)
    except TypeError:
        raise TypeError(
            f"calib must be a tensor or an iterable of batches, got {type(calib).__name__}"
        ) from None
    count = 0
    for batch in iterator:
        x = batch[0] if isinstance(batch, (tuple, list)) and batch else batch
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"calibration batch {count} holds no tensor (got {type(x).__name__})")
        count += 1
        yield x if device is None else x.to(device)
    if count == 0:
        raise ValueError("the calibration set yielded no batches")


def model_device(model: nn.Module) -> torch.device | None:
    """The device of the model's first parameter or buffer (``None`` if it has neither)."""
    for t in (*model.parameters(), *model.buffers()):
        return t.device
    return None
