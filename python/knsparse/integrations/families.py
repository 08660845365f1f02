"""Model families: how knsparse recognises the building blocks of the models it supports.

One :class:`Family` entry per source of models (knsparse's built-in architectures, timm, ...)
names the classes that play each role. Every stage that needs to know "is this a ViT block, an
attention, an MLP, a ResNet block" asks this module — token merging, activation fusion, MAC
accounting, channel permutation — so supporting a new family is one :func:`register_family`
call (the built-in ones are the entries of :data:`FAMILIES`).

Classes are matched by exact type (module path and class name), never by ``isinstance``: a
subclass may override ``forward`` and break the structure a role promises. Nothing here imports
the families' packages, so an optional dependency that is missing costs nothing.

The roles and what they promise:

* ``vit_block``: a pre-norm transformer block ``x + attn(norm1(x))`` then ``x + mlp(norm2(x))``
  (optional ``ls1``/``ls2`` layer scales and ``drop_path1``/``drop_path2``).
* ``attention``: global multi-head self-attention with a fused ``qkv`` Linear whose output rows
  are ``(3, heads, head_dim)``, a ``proj`` Linear reading the concatenated heads and an int
  ``num_heads``.
* ``split_attention``: global multi-head self-attention with separate ``q_proj``/``k_proj``/
  ``v_proj`` Linears whose output rows are ``(heads, head_dim)``, an ``o_proj`` Linear reading
  the concatenated heads, and int ``num_attention_heads`` and ``head_dim`` (Hugging Face).
* ``window_attention``: the same projections inside windows (Swin): its value/``proj`` coupling
  holds, but tokens cannot be merged across it.
* ``mlp``: ``fc2(... act(fc1(x)))`` where ``act`` reads ``fc1``'s output and nothing else
  (optionally followed by dropout and a per-channel ``norm``).
* ``conv_block``: a ResNet block ``conv1 → bn1 → act → conv2 → bn2 → act [→ conv3]`` whose
  optional extras (``drop_block``, ``aa``) sit between ``conv2`` and its input.
* ``conv``: an ``nn.Conv2d`` subclass whose forward is the convolution of its own weight and bias
  (it may pad first, e.g. TensorFlow's "same" padding computed from the input size): it reads and
  writes channels exactly as ``nn.Conv2d`` does.
* ``norm_act``: an ``nn.BatchNorm2d`` subclass whose forward is its batch norm followed by its
  child modules (dropout, activation) applied elementwise.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn


@dataclass(frozen=True)
class ClassRef:
    """A class named by its module (or package prefix) and name."""

    module: str
    name: str

    def matches(self, obj: object) -> bool:
        cls = type(obj)
        mod = cls.__module__
        return cls.__name__ == self.name and (mod == self.module or mod.startswith(self.module + "."))

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Family:
    """The classes of one model source, by role (see the module docstring)."""

    name: str
    vit_block: tuple[ClassRef, ...] = ()
    attention: tuple[ClassRef, ...] = ()
    window_attention: tuple[ClassRef, ...] = ()
    split_attention: tuple[ClassRef, ...] = ()
    mlp: tuple[ClassRef, ...] = ()
    conv_block: tuple[ClassRef, ...] = ()
    conv: tuple[ClassRef, ...] = ()
    norm_act: tuple[ClassRef, ...] = ()


FAMILIES: list[Family] = [
    Family(
        "knsparse",
        vit_block=(ClassRef("knsparse.models.vit", "Block"),),
        attention=(ClassRef("knsparse.models.vit", "Attention"),),
        mlp=(ClassRef("knsparse.models.vit", "Mlp"),),
        conv_block=(ClassRef("knsparse.models.resnet", "Bottleneck"),),
    ),
    Family(
        "timm",
        vit_block=(ClassRef("timm", "Block"),),
        attention=(ClassRef("timm", "Attention"),),
        window_attention=(ClassRef("timm", "WindowAttention"),),
        mlp=(ClassRef("timm", "Mlp"),),
        conv_block=(ClassRef("timm", "Bottleneck"), ClassRef("timm", "BasicBlock")),
        conv=(ClassRef("timm", "Conv2dSame"),),
        norm_act=(ClassRef("timm", "BatchNormAct2d"),),
    ),
    Family(
        "huggingface",
        split_attention=(ClassRef("transformers.models.vit.modeling_vit", "ViTAttention"),),
    ),
]
"""The family registry, asked in order; :func:`register_family` adds to it."""


def register_family(family: Family, *, replace: bool = False) -> Family:
    """Add ``family`` to the registry, so every stage recognises its classes (token merging,
    activation fusion, MAC accounting, channel permutation). A family of a name already
    registered is a ``ValueError`` unless ``replace=True`` (then it takes that entry's place)::

        ks.register_family(Family("mylib", mlp=(ClassRef("mylib.layers", "FeedForward"),)))

    Returns ``family``."""
    if not isinstance(family, Family):
        raise TypeError(f"register_family takes a knsparse Family, got {type(family).__name__}")
    names = [f.name for f in FAMILIES]
    if family.name in names:
        if not replace:
            raise ValueError(f"family {family.name!r} is already registered (pass replace=True to override)")
        FAMILIES[names.index(family.name)] = family
    else:
        FAMILIES.append(family)
    return family


def _refs(role: str) -> tuple[ClassRef, ...]:
    return tuple(ref for family in FAMILIES for ref in getattr(family, role))


def family_of(module: nn.Module, role: str) -> Family | None:
    """The family whose ``role`` (a :class:`Family` field name) lists ``type(module)``, or None."""
    for family in FAMILIES:
        if any(ref.matches(module) for ref in getattr(family, role)):
            return family
    return None


def known_classes(role: str) -> str:
    """The classes that can play ``role``, comma-separated (for error messages)."""
    return ", ".join(str(ref) for ref in _refs(role))


def is_vit_block(module: nn.Module) -> bool:
    return family_of(module, "vit_block") is not None


def is_mlp(module: nn.Module) -> bool:
    return family_of(module, "mlp") is not None


def is_conv_block(module: nn.Module) -> bool:
    return family_of(module, "conv_block") is not None


def is_plain_conv(module: nn.Module) -> bool:
    """An ``nn.Conv2d`` of the ``conv`` role (channels as ``nn.Conv2d``; see the module docstring)."""
    return isinstance(module, nn.Conv2d) and family_of(module, "conv") is not None


def is_norm_act(module: nn.Module) -> bool:
    """An ``nn.BatchNorm2d`` of the ``norm_act`` role (batch norm, then its children elementwise)."""
    return isinstance(module, nn.BatchNorm2d) and family_of(module, "norm_act") is not None


def _linear_like(module: object) -> bool:
    """An ``nn.Linear`` or a module standing in for one (knsparse's ``SparseLinear``)."""
    return isinstance(module, nn.Module) and all(
        isinstance(getattr(module, a, None), int) for a in ("in_features", "out_features")
    )


def attention_parts(module: nn.Module, *, windowed: bool = True) -> tuple[nn.Linear, nn.Linear, int] | None:
    """``(qkv, proj, head_dim)`` of a registered attention module (window attention too unless
    ``windowed=False``) whose projections (Linear, or swapped sparse Linear) have the promised
    shapes, else ``None``."""
    roles = ("attention", "window_attention") if windowed else ("attention",)
    if not any(family_of(module, role) is not None for role in roles):
        return None
    qkv, proj = getattr(module, "qkv", None), getattr(module, "proj", None)
    heads = getattr(module, "num_heads", None)
    if not (_linear_like(qkv) and _linear_like(proj) and isinstance(heads, int)):
        return None
    dim = proj.in_features
    if heads <= 0 or dim % heads or qkv.out_features != 3 * dim:
        return None
    return qkv, proj, dim // heads


def split_attention_parts(module: nn.Module) -> tuple[str, str, int] | None:
    """``("v_proj", "o_proj", head_dim)`` of a registered ``split_attention`` module whose
    projections have the promised shapes, else ``None``."""
    if family_of(module, "split_attention") is None:
        return None
    heads, head_dim = getattr(module, "num_attention_heads", None), getattr(module, "head_dim", None)
    projections = [getattr(module, f"{p}_proj", None) for p in "qkvo"]
    if not (isinstance(heads, int) and isinstance(head_dim, int) and all(map(_linear_like, projections))):
        return None
    width = heads * head_dim
    if any(p.out_features != width for p in projections[:3]) or projections[3].in_features != width:
        return None
    return "v_proj", "o_proj", head_dim


def has_vit_blocks(model: nn.Module) -> bool:
    """True when any submodule of ``model`` is a registered ViT block."""
    return any(is_vit_block(m) for m in model.modules())
