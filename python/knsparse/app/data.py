"""scikit-learn's bundled ``load_digits``: 1797 real 8x8 grey-scale handwritten digits.

It ships inside scikit-learn, so training and evaluation run offline on any machine.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


@dataclass(frozen=True)
class DigitsSplit:
    """Standardised images ``[N, 1, 8, 8]`` float32 and labels ``[N]`` int64."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(seed: int = 0, test_fraction: float = 0.2) -> DigitsSplit:
    """Stratified train/test split of the digits, standardised with the training statistics."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        images.astype(np.float32),
        labels,
        test_size=test_fraction,
        random_state=seed,
        stratify=labels,
    )
    mean, std = x_tr.mean(), x_tr.std()

    def images_of(x: np.ndarray) -> torch.Tensor:
        return torch.from_numpy((x - mean) / std).reshape(-1, 1, 8, 8)

    return DigitsSplit(
        images_of(x_tr), torch.from_numpy(y_tr).long(), images_of(x_te), torch.from_numpy(y_te).long()
    )


def validation_split(data: DigitsSplit, fraction: float = 0.2, seed: int = 0) -> DigitsSplit:
    """Hold out a stratified ``fraction`` of the *training* images for model selection.

    Returns a split whose ``x_train``/``y_train`` are the rest of the training images and whose
    ``x_test``/``y_test`` are the held-out validation images; ``data``'s test images are not
    used. Standardisation is left as it is (training statistics of ``data``).
    """
    if not 0.0 < fraction < 1.0:
        raise ValueError(f"validation fraction must be in (0, 1), got {fraction}")
    from sklearn.model_selection import train_test_split

    fit, val = train_test_split(
        torch.arange(len(data.y_train)).numpy(),
        test_size=fraction,
        random_state=seed,
        stratify=data.y_train.numpy(),
    )
    fit, val = torch.from_numpy(fit), torch.from_numpy(val)
    return DigitsSplit(data.x_train[fit], data.y_train[fit], data.x_train[val], data.y_train[val])


def calibration_batches(data: DigitsSplit, batch_size: int = 64, n_batches: int = 4, seed: int = 0):
    """A list of ``n_batches`` random training-image batches ``[batch_size, 1, 8, 8]``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=g)[: batch_size * n_batches]
    return list(data.x_train[idx].split(batch_size))
