"""Model inputs from a calibration set.

``calib`` is a tensor (one batch), or an iterable of batches (a list, a DataLoader); a batch
is the model input or a tuple/list whose first element is.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch


def input_batches(calib: object) -> Iterator[torch.Tensor]:
    """Yield the input tensor of every batch; ``ValueError`` if there is none,
    ``TypeError`` if a batch holds no tensor."""
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
        yield x
    if count == 0:
        raise ValueError("the calibration set yielded no batches")
