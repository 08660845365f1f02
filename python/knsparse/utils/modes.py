"""Training flags: every stage that runs a user's model leaves each module's flag as it found it.

``model.train(was_training)`` is not a restore: it sets every submodule to the top module's
flag, so a frozen BatchNorm (``eval()`` inside a ``train()`` model) would flip. These context
managers record the flag of every module and put each one back.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from torch import nn


@contextmanager
def kept_modes(model: nn.Module) -> Iterator[nn.Module]:
    """Inside the block the caller may switch modules freely; after it (also on an error)
    every module of ``model`` has its own ``training`` flag back."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield model
    finally:
        for module, flag in flags:
            module.training = flag


@contextmanager
def evaluation(model: nn.Module) -> Iterator[nn.Module]:
    """``model`` in eval mode inside the block; every module's own flag restored after it."""
    with kept_modes(model):
        model.eval()
        yield model
