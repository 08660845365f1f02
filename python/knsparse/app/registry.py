"""The CLI's model registry: a model name -> the model, its input shape, how its images are
preprocessed and a description, with a user's checkpoint loaded into it.

Sources: the built-ins (``vit_tiny_digits``, ``resnet_tiny_digits``, ``vit_base_patch16_224``,
``resnet50``), ``timm:NAME``, ``torchvision:NAME`` (random init: the user's ``--weights`` bring
the values) and ``hf:DIR`` (a local Hugging Face model directory, read offline; its own weights
if it holds them). timm, torchvision and transformers are optional: a missing one is named.
Every ``nn.MultiheadAttention`` (torchvision's ViT) becomes
:class:`knsparse.integrations.mha.LinearMultiheadAttention` after the weights are in, so its
q/k/v and output projections can be pruned and swapped.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..integrations import mha
from .checkpoints import from_efficientnet_pytorch, is_efficientnet_pytorch
from .errors import UserError
from .images import IMAGENET, Preprocess

MODELS_HELP = (
    "vit_tiny_digits and resnet_tiny_digits (trained on the bundled digits, cached), "
    "vit_base_patch16_224 and resnet50 (ImageNet shapes, random weights), timm:<name> or "
    "torchvision:<name> (random weights unless --weights), or hf:<dir> (a local Hugging Face "
    "model directory, offline)"
)
CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
DIGITS_MODELS = ("vit_tiny_digits", "resnet_tiny_digits")
"""The built-ins trained on the bundled digits: their data is bundled, they take no user images."""


@dataclass
class LoadedModel:
    model: nn.Module
    input_shape: tuple[int, int, int]
    """``(C, H, W)`` of one image."""
    description: str
    preprocess: Preprocess | None = None
    """How a user's images become inputs; ``None`` for the digits models (bundled data)."""


def _optional(package: str, name: str, extra: str):
    try:
        return __import__(package)
    except Exception as exc:  # missing, or broken beside this torch (torchvision on a CPU wheel)
        raise UserError(
            f"model {name!r} needs {package} (pip install 'knsparse[{extra}]'); importing it failed: {exc}"
        ) from exc


def _builtin(name: str, seed: int, weights: bool) -> LoadedModel | None:
    from .. import models
    from .trainer import pretrained

    digits = dict(zip(DIGITS_MODELS, (models.vit_tiny_digits, models.resnet_tiny_digits), strict=True))
    imagenet = {"vit_base_patch16_224": models.vit_base_patch16_224, "resnet50": models.resnet50}
    if name in digits:
        if weights:  # the file supplies the weights: no need to train
            return LoadedModel(digits[name]().eval(), (1, 8, 8), name)
        return LoadedModel(pretrained(name, seed=seed), (1, 8, 8), f"{name} (trained on digits, seed {seed})")
    if name in imagenet:
        torch.manual_seed(seed)
        return LoadedModel(imagenet[name]().eval(), (3, 224, 224), f"{name} (random weights)", IMAGENET)
    return None


def _timm(arch: str, name: str, num_classes: int | None = None) -> LoadedModel:
    timm = _optional("timm", name, "timm")
    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = timm.create_model(arch, pretrained=False, **extra).eval()
    except RuntimeError as exc:
        raise UserError(f"timm has no model {arch!r}") from exc
    cfg = model.pretrained_cfg
    c, h, w = cfg.get("input_size", (3, 224, 224))
    interpolation = cfg.get("interpolation", "bilinear")
    preprocess = Preprocess.from_crop_pct(
        (h, w),
        float(cfg.get("crop_pct", 0.875)),
        mean=tuple(cfg.get("mean", IMAGENET.mean)),
        std=tuple(cfg.get("std", IMAGENET.std)),
        interpolation=interpolation if interpolation in ("bilinear", "bicubic", "nearest") else "bilinear",
    )
    return LoadedModel(model, (c, h, w), f"{name} (random weights)", preprocess)


def _torchvision(arch: str, name: str, num_classes: int | None = None) -> LoadedModel:
    _optional("torchvision", name, "torchvision")
    import torchvision

    extra = {} if num_classes is None else {"num_classes": num_classes}
    try:
        model = torchvision.models.get_model(arch, weights=None, **extra).eval()
    except ValueError as exc:
        raise UserError(f"torchvision has no model {arch!r}") from exc
    preprocess = IMAGENET
    try:  # the transform of the model's published weights, defined in code (nothing downloaded)
        t = torchvision.models.get_model_weights(arch).DEFAULT.transforms()
        crop, resize = int(t.crop_size[0]), int(t.resize_size[0])
        mode = str(getattr(t.interpolation, "value", t.interpolation)).lower()
        preprocess = Preprocess(
            resize,
            (crop, crop),
            tuple(t.mean),
            tuple(t.std),
            mode if mode in ("bilinear", "bicubic") else "bilinear",
        )
    except (ValueError, AttributeError, KeyError):
        pass
    c = 3
    return LoadedModel(model, (c, *preprocess.crop), f"{name} (random weights)", preprocess)


def _hf(directory: str, name: str) -> LoadedModel:
    root = Path(directory)
    if not (root / "config.json").is_file():
        raise UserError(f"{name!r}: {root} is not a Hugging Face model directory (no config.json)")
    transformers = _optional("transformers", name, "hf")
    config = transformers.AutoConfig.from_pretrained(str(root), local_files_only=True)
    has_weights = any((root / f).is_file() for f in ("model.safetensors", "pytorch_model.bin"))
    if has_weights:
        model = transformers.AutoModelForImageClassification.from_pretrained(str(root), local_files_only=True)
        description = f"{name} (weights from {root})"
    else:
        model = transformers.AutoModelForImageClassification.from_config(config)
        description = f"{name} (random weights)"
    size = getattr(config, "image_size", 224)
    size = tuple(size) if isinstance(size, (list, tuple)) else (size, size)
    channels = int(getattr(config, "num_channels", 3))
    preprocess = _hf_preprocess(root / "preprocessor_config.json", size, channels)
    return LoadedModel(model.eval(), (channels, *preprocess.crop), description, preprocess)


def _hf_preprocess(path: Path, size: tuple[int, int], channels: int) -> Preprocess:
    """A Hugging Face image processor's resize / crop / normalise numbers (its JSON file)."""
    if not path.is_file():
        return Preprocess(size[0], size, IMAGENET.mean[:channels], IMAGENET.std[:channels])
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise UserError(f"{path} is not valid JSON: {exc}") from exc
    mean = tuple(cfg.get("image_mean", IMAGENET.mean))
    std = tuple(cfg.get("image_std", IMAGENET.std))
    resample = {0: "nearest", 2: "bilinear", 3: "bicubic"}.get(cfg.get("resample", 2), "bilinear")
    target = cfg.get("size", {"height": size[0], "width": size[1]})
    if isinstance(target, int):
        target = {"shortest_edge": target}
    crop = cfg.get("crop_size") if cfg.get("do_center_crop") else None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    if "shortest_edge" in target:
        edge = int(target["shortest_edge"])
        crop_hw = (int(crop["height"]), int(crop["width"])) if crop else (edge, edge)
        pct = cfg.get("crop_pct")
        resize = int(edge / pct) if pct else edge
        return Preprocess(max(resize, *crop_hw), crop_hw, mean, std, resample)
    hw = (int(target["height"]), int(target["width"]))
    crop_hw = (int(crop["height"]), int(crop["width"])) if crop else hw
    return Preprocess(max(*hw, *crop_hw), crop_hw, mean, std, resample)


def resolve(name: str, seed: int = 0, weights: bool = False, num_classes: int | None = None) -> LoadedModel:
    """The model ``name`` names (see the module docstring); ``UserError`` for an unknown one.
    ``num_classes`` rebuilds a timm / torchvision model with a classifier of that many classes."""
    builtin = _builtin(name, seed, weights)
    if builtin is not None:
        return builtin
    source, _, rest = name.partition(":")
    if rest and source == "timm":
        return _timm(rest, name, num_classes)
    if rest and source == "torchvision":
        return _torchvision(rest, name, num_classes)
    if rest and source == "hf":
        return _hf(rest, name)
    raise UserError(f"unknown model {name!r}; choose {MODELS_HELP}")


def read_checkpoint(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state dict, safetensors metadata)`` of a checkpoint file, read safely: safetensors, or
    ``.pt`` / ``.pth`` / ``.bin`` through ``torch.load(weights_only=True)`` (a ``state_dict`` /
    ``model`` entry is unwrapped, a DDP ``module.`` prefix dropped; the order of the keys is kept)."""
    from safetensors import SafetensorError, safe_open

    if path.suffix not in CHECKPOINT_SUFFIXES:
        raise UserError(
            f"{path}: unknown checkpoint type {path.suffix!r}; give one of {', '.join(CHECKPOINT_SUFFIXES)}"
        )
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt") as f:
                return {k: f.get_tensor(k) for k in f.keys()}, dict(f.metadata() or {})  # noqa: SIM118
        except (SafetensorError, OSError) as exc:  # truncated, a pickle renamed, unreadable
            raise UserError(f"{path} is not a readable safetensors file: {exc}") from exc
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # unpickling refused (code objects), truncated, not a torch file
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"{path} cannot be loaded safely (torch.load weights_only=True): {first}") from exc
    for key in ("state_dict", "model"):
        if isinstance(state, Mapping) and isinstance(state.get(key), Mapping):
            state = state[key]
    if not isinstance(state, Mapping) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise UserError(f"{path} holds no state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k.removeprefix("module."): v for k, v in state.items()}
    return dict(state), {}


def _fit_state_dict(model: nn.Module, state: Mapping[str, torch.Tensor], path: Path, name: str) -> None:
    """Load ``state`` strictly; ``UserError`` naming missing / unexpected keys and wrong shapes first."""
    own = model.state_dict()
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    shapes = [k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"missing keys {missing[:4]}{' ...' if len(missing) > 4 else ''} ({len(missing)})")
        if unexpected:
            parts.append(
                f"unexpected keys {unexpected[:4]}{' ...' if len(unexpected) > 4 else ''} ({len(unexpected)})"
            )
        if shapes:
            k = shapes[0]
            parts.append(
                f"{k} has shape {tuple(state[k].shape)}, the model {tuple(own[k].shape)} ({len(shapes)} such)"
            )
        raise UserError(f"{path} does not fit model {name!r}: " + "; ".join(parts))
    model.load_state_dict(state)


def _head_classes(model: nn.Module, state: Mapping[str, torch.Tensor]) -> int | None:
    """The checkpoint's class count when the classifier (the model's last Linear) is the only
    part whose shape differs from ``model``'s, else ``None``."""
    own = model.state_dict()
    differs = {k for k in own if k in state and tuple(own[k].shape) != tuple(state[k].shape)}
    heads = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not differs or not heads:
        return None
    head = heads[-1]
    if differs - {f"{head}.weight", f"{head}.bias"}:
        return None
    # a knsparse file stores a swapped head as values/slots: its bias still tells the class count
    key = next(k for k in (f"{head}.weight", f"{head}.bias") if k in differs)
    return int(state[key].shape[0])


def load_model(name: str, weights: str | None = None, seed: int = 0) -> LoadedModel:
    """The model ``name`` names, with ``weights`` (a ``knsparse prune`` output, or a state dict
    of that architecture: safetensors, ``.pt``, ``.pth``) loaded when given. A timm or
    torchvision checkpoint whose classifier has another class count builds the model with it."""
    path = None if weights is None else Path(weights)
    if path is not None and not path.is_file():
        raise UserError(f"no weights file at {path}")
    if path is not None:
        state, metadata = read_checkpoint(path)  # read before the model is built: bad files fail fast
    loaded = resolve(name, seed, path is not None)
    if path is None:
        mha.convert(loaded.model)
        return loaded
    from ..sparse.io import load_sparse

    foreign = state if is_efficientnet_pytorch(state) else None
    context = f"{path} does not fit model {name!r}"
    if foreign is not None:  # efficientnet_pytorch's names, renamed to timm's (shapes checked below)
        state = from_efficientnet_pytorch(foreign, loaded.model.state_dict(), context, shapes=False)
    classes = _head_classes(loaded.model, state) if name.startswith(("timm:", "torchvision:")) else None
    if classes is not None:  # a fine-tuned checkpoint with its own classifier: build the model to fit
        loaded = resolve(name, seed, True, classes)
    if foreign is not None:  # every key, its order and its shape, naming the checkpoint's own key
        state = from_efficientnet_pytorch(foreign, loaded.model.state_dict(), context)
    if "knsparse.sparse_layers" in metadata:
        mha.convert(loaded.model)  # a knsparse file was saved from the converted model
        try:
            load_sparse(loaded.model, path)
        except (RuntimeError, KeyError, OSError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"{path} does not fit model {name!r}: {first}") from exc
    else:
        _fit_state_dict(loaded.model, state, path, name)  # the source's own keys (in_proj_weight)
        mha.convert(loaded.model)
    converted = "" if foreign is None else " (efficientnet_pytorch key names)"
    loaded.description = f"{name} with weights from {path}{converted}"
    return loaded
