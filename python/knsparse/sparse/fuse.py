"""Fuse the activation after a sparse ``fc1`` into its GEMM (transformer MLP blocks).

In an MLP ``fc2(act(fc1(x)))`` the activation reads and writes the whole hidden tensor (4x the
model width) once more after ``fc1``'s GEMM. :func:`fuse_activations` moves it into ``fc1``: the
``SparseLinear`` gets ``activation="gelu"`` (or ``"relu"``) and the container's ``act`` becomes
``nn.Identity``. knsparse-cuda applies it in the CUTLASS epilogue (bias + activation on the
accumulator, one pass); the other backends apply it right after their GEMM, so the model
computes the same on every backend.

Only containers known to apply ``act`` to ``fc1``'s output and to nothing else are touched:
the ``mlp`` role of :mod:`knsparse.families` (knsparse's built-in ``Mlp`` ``fc2(act(fc1(x)))``,
timm's ``Mlp`` ``fc1 → act → drop1 → norm → fc2``), matched by exact type. The activation must
be ``nn.GELU()`` (erf; ``approximate="tanh"`` is another function) or ``nn.ReLU``.
:func:`knsparse.sparse.densify.dense_copy` and :func:`knsparse.sparse.io.load_sparse` undo / redo the move.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from ..core.checks import check_module
from ..core.plan import SparsityPlan, plan_masks
from ..integrations import families
from .modules import SparseLinear


def activation_kind(act: nn.Module) -> str | None:
    """``"gelu"`` / ``"relu"`` for the activations a fused epilogue computes exactly, else None."""
    if type(act) is nn.GELU and act.approximate == "none":
        return "gelu"
    if type(act) is nn.ReLU:
        return "relu"
    return None


def _container(model: nn.Module, fc1_name: str) -> nn.Module:
    parent_name, _, child = fc1_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    if child != "fc1" or not families.is_mlp(parent):
        raise ValueError(
            f"layer {fc1_name!r}: an activation can only be fused into the fc1 of a known MLP "
            f"container ({families.known_classes('mlp')}), not a {type(parent).__name__}"
        )
    return parent


def check_fusable(model: nn.Module, fc1_name: str, activation: str) -> nn.Module:
    """The MLP holding ``fc1_name`` if its ``act`` is ``activation`` (or already Identity), else
    ``ValueError``; changes nothing."""
    parent = _container(model, fc1_name)
    act = getattr(parent, "act", None)
    if not isinstance(act, nn.Identity) and (act is None or activation_kind(act) != activation):
        raise ValueError(f"layer {fc1_name!r}: its MLP applies {act!r}, not {activation!r}")
    return parent


def absorb_activation(model: nn.Module, fc1_name: str, activation: str) -> None:
    """Replace the ``act`` of the MLP holding ``fc1_name`` by ``nn.Identity`` (after
    :func:`check_fusable`): the fused ``fc1`` applies it now."""
    check_fusable(model, fc1_name, activation).act = nn.Identity()


def restore_activation(model: nn.Module, fc1_name: str, activation: str) -> None:
    """Put the activation fused into ``fc1_name`` back into its MLP's ``act`` (the dense twin)."""
    parent = _container(model, fc1_name)
    parent.act = nn.GELU() if activation == "gelu" else nn.ReLU()


def fuse_activations(
    model: nn.Module, plan: SparsityPlan | Mapping[str, torch.Tensor] | None = None
) -> dict[str, str]:
    """Fuse every fusable MLP activation of ``model`` (in place) into its sparse ``fc1``; with a
    ``plan`` (or a mask dict), only those whose ``fc1`` the plan names.

    Returns ``{fc1 name: activation}`` of what was fused. MLPs whose ``fc1`` is still dense,
    already fused, or whose activation no epilogue computes exactly are left as they are.
    """
    fused = {}
    check_module(model)
    planned = None if plan is None else set(plan_masks(plan))
    for name, module in model.named_modules():
        if not families.is_mlp(module):
            continue
        fc1, kind = getattr(module, "fc1", None), activation_kind(getattr(module, "act", nn.Identity()))
        fc1_name = f"{name}.fc1" if name else "fc1"
        if planned is not None and fc1_name not in planned:
            continue
        if isinstance(fc1, SparseLinear) and fc1.activation == "none" and kind is not None:
            fc1.activation = kind
            absorb_activation(model, fc1_name, kind)
            fused[fc1_name] = kind
    return fused
