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


def calibration_batches(data: DigitsSplit, batch_size: int = 64, n_batches: int = 4, seed: int = 0):
    """A list of ``n_batches`` random training-image batches ``[batch_size, 1, 8, 8]``."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.randperm(len(data.x_train), generator=g)[: batch_size * n_batches]
    return list(data.x_train[idx].split(batch_size))
