"""Seeded training and evaluation of the built-in models on the bundled digits.

``pretrained(name)`` trains a model once and caches its weights as safetensors under
``$KNSPARSE_CACHE`` (default ``~/.cache/knsparse``); later calls load the cached file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from ..core.masks import apply_masks
from ..models import resnet_tiny_digits, vit_tiny_digits
from ..utils.cache import cache_dir
from .data import DigitsSplit, load_digits_split, validation_split


@dataclass(frozen=True)
class Recipe:
    epochs: int
    lr: float
    weight_decay: float = 0.05
    batch_size: int = 64


RECIPES: dict[str, tuple[Callable[[], nn.Module], Recipe]] = {
    "vit_tiny_digits": (vit_tiny_digits, Recipe(epochs=30, lr=2e-3)),
    "resnet_tiny_digits": (resnet_tiny_digits, Recipe(epochs=15, lr=3e-3, weight_decay=1e-4)),
}


# Bump when train() changes what a seed produces (2: single-threaded, thread-count independent).
TRAINER_VERSION = 2


@contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run the block with ``n`` torch intra-op threads, then restore the previous count."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train(
    model: nn.Module,
    data: DigitsSplit,
    epochs: int,
    lr: float = 2e-3,
    weight_decay: float = 0.05,
    batch_size: int = 64,
    masks: Mapping[str, torch.Tensor] | None = None,
    seed: int = 0,
    progress: bool = True,
    desc: str = "train",
) -> nn.Module:
    """AdamW with a cosine schedule and label smoothing; returns ``model`` (trained in place).

    ``masks`` keeps a sparsity pattern fixed: pruned weights are zeroed before training and
    after every optimiser step. Training runs on one intra-op thread: float sums then add up in
    one order whatever the machine's core count, so a seed gives the same weights on every
    machine with the same torch build (the digits models are too small to gain from threads).
    """
    with torch_threads(1):
        return _train(model, data, epochs, lr, weight_decay, batch_size, masks, seed, progress, desc)


def _train(
    model: nn.Module,
    data: DigitsSplit,
    epochs: int,
    lr: float,
    weight_decay: float,
    batch_size: int,
    masks: Mapping[str, torch.Tensor] | None,
    seed: int,
    progress: bool,
    desc: str,
) -> nn.Module:
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    steps_per_epoch = -(-len(data.x_train) // batch_size)
    sched = torch.optim.lr_scheduler.OneCycleLR(
        opt, max_lr=lr, total_steps=epochs * steps_per_epoch, pct_start=0.15
    )
    loss_fn = nn.CrossEntropyLoss(label_smoothing=0.1)
    if masks:
        apply_masks(model, masks)
    model.train()
    for _ in tqdm(range(epochs), desc=desc, disable=not progress, leave=False):
        order = torch.randperm(len(data.x_train), generator=g)
        for idx in order.split(batch_size):
            loss = loss_fn(model(data.x_train[idx]), data.y_train[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            if masks:
                apply_masks(model, masks)
    model.eval()
    return model


@torch.no_grad()
def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int = 512) -> float:
    """Top-1 accuracy in [0, 1]."""
    model.eval()
    correct = 0
    for xb, yb in zip(x.split(batch_size), y.split(batch_size), strict=True):
        correct += (model(xb).argmax(-1) == yb).sum().item()
    return correct / len(y)


def _checkpoint_path(name: str, seed: int, validation: float = 0.0, train_seed: int | None = None) -> Path:
    build, recipe = RECIPES[name]
    # The file name carries a hash of the recipe, the parameter shapes and the training
    # procedure's version, so a changed model, recipe or trainer never loads a stale checkpoint.
    shapes = {k: list(v.shape) for k, v in build().state_dict().items()}
    key: dict[str, object] = {
        "recipe": asdict(recipe),
        "shapes": shapes,
        "seed": seed,
        "trainer": TRAINER_VERSION,
    }
    tag = ""
    if validation:
        key["validation"] = validation
        tag = f"-val{round(validation * 100)}"
    if train_seed is not None and train_seed != seed:
        key["train_seed"] = train_seed
        tag += f"-train{train_seed}"
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:12]
    return cache_dir() / f"{name}{tag}-seed{seed}-{digest}.safetensors"


def pretrained(
    name: str, seed: int = 0, progress: bool = True, validation: float = 0.0, train_seed: int | None = None
) -> nn.Module:
    """A built-in model trained on the digits split of ``seed`` (cached after the first call).

    With ``validation > 0`` the model is trained only on the training images left after
    :func:`~knsparse.app.data.validation_split` holds out that fraction (same ``seed``), so
    choices made on those held-out images never see the test split nor images it was trained on.
    ``train_seed`` (default ``seed``) seeds the initialisation and the batch order alone: several
    training seeds on one split measure the spread of a result over trained models on one test set.
    """
    if name not in RECIPES:
        raise ValueError(f"unknown built-in model {name!r}; choose from {sorted(RECIPES)}")
    build, recipe = RECIPES[name]
    path = _checkpoint_path(name, seed, validation, train_seed)
    init_seed = seed if train_seed is None else train_seed
    torch.manual_seed(init_seed)
    model = build()
    if path.exists():
        model.load_state_dict(load_file(str(path)))
        return model.eval()
    data = load_digits_split(seed)
    train(
        model,
        validation_split(data, validation, seed) if validation else data,
        recipe.epochs,
        recipe.lr,
        recipe.weight_decay,
        recipe.batch_size,
        seed=init_seed,
        progress=progress,
        desc=f"train {name}",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return model
