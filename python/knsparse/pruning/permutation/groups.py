"""Channel groups: the tensors that must be permuted together to keep a model's function.

A *channel group* is one activation space (e.g. the hidden units between ``fc1`` and
``fc2``). Permuting its channels by ``perm`` (new channel ``j`` is old channel ``perm[j]``)
leaves the model's function unchanged when every member follows:

* ``consumer`` — a Linear / ungrouped Conv2d reading the space: input columns ``weight[:, perm]``.
  Consumers are the layers whose k:n masks the permutation improves.
* ``producer`` — a Linear / Conv2d writing it: output rows ``weight[offset + perm]`` and bias
  (``offset`` selects the value rows inside a fused ``qkv`` projection).
* ``channelwise`` — a per-channel module on the way (BatchNorm statistics and affine,
  LayerNorm affine, depthwise conv): every per-channel tensor.
* ``parameter`` — a tensor added or multiplied into the space (``pos_embed``, ``cls_token``,
  layer scales) along dimension ``dim``.

``block`` confines the permutation to consecutive blocks of channels (attention heads).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from ...integrations.families import attention_parts, split_attention_parts

# Modules that act on every channel alike, so they commute with a channel permutation.
ELEMENTWISE_MODULES = (
    nn.ReLU,
    nn.ReLU6,
    nn.GELU,
    nn.SiLU,
    nn.Sigmoid,
    nn.Tanh,
    nn.Hardswish,
    nn.Hardsigmoid,
    nn.Hardtanh,
    nn.LeakyReLU,
    nn.ELU,
    nn.Mish,
    nn.Softplus,
    nn.Dropout,
    nn.Dropout2d,
    nn.Identity,
)
Role = Literal["consumer", "producer", "channelwise", "parameter"]


@dataclass(frozen=True)
class Member:
    name: str
    role: Role
    dim: int = 0
    offset: int = 0


@dataclass
class ChannelGroup:
    """One activation space and its members; ``skip_reason`` is set when it must not move."""

    members: list[Member]
    block: int | None = None
    skip_reason: str | None = None
    source: str = "fx"

    @property
    def consumers(self) -> list[str]:
        return [m.name for m in self.members if m.role == "consumer"]

    @property
    def name(self) -> str:
        producers = [m.name for m in self.members if m.role == "producer"]
        consumers = self.consumers
        head = f"{producers[0]} -> " if producers else ""
        more = f" (+{len(consumers) - 1} more)" if len(consumers) > 1 else ""
        return f"{head}{consumers[0] if consumers else '?'}{more}"


@dataclass
class GroupList:
    """Groups found in a model, with why the graph analysis fell back (if it did)."""

    groups: list[ChannelGroup] = field(default_factory=list)
    trace_error: str | None = None


def attention_group(name: str, module: nn.Module, source: str) -> ChannelGroup:
    """Value rows (of ``qkv``, or ``v_proj``) and input columns of the output projection,
    permuted within each head."""
    prefix = f"{name}." if name else ""
    if (parts := attention_parts(module)) is not None:
        _, proj, head_dim = parts
        value = Member(f"{prefix}qkv", "producer", offset=2 * proj.in_features)
        out = f"{prefix}proj"
    elif (split := split_attention_parts(module)) is not None:
        value_name, out_name, head_dim = split
        value, out = Member(f"{prefix}{value_name}", "producer"), f"{prefix}{out_name}"
    else:
        raise ValueError(f"module {name!r} is not a registered attention (knsparse.families)")
    return ChannelGroup([Member(out, "consumer"), value], block=head_dim, source=source)


def _channels_of(member: Member, obj: nn.Module | torch.Tensor) -> int | None:
    if member.role == "parameter":
        return obj.shape[member.dim] if isinstance(obj, torch.Tensor) else None
    if member.role == "consumer":
        if isinstance(obj, nn.Linear):
            return obj.in_features
        if isinstance(obj, nn.Conv2d) and obj.groups == 1:
            return obj.in_channels
        return None
    if member.role == "producer":
        if isinstance(obj, nn.Linear):
            return obj.out_features - member.offset
        if isinstance(obj, nn.Conv2d):
            return obj.out_channels - member.offset
        return None
    if isinstance(obj, nn.modules.batchnorm._BatchNorm):
        return obj.num_features
    if isinstance(obj, nn.LayerNorm) and len(obj.normalized_shape) == 1:
        return obj.normalized_shape[0]
    if isinstance(obj, nn.Conv2d) and obj.groups == obj.in_channels == obj.out_channels:
        return obj.out_channels
    return None


def resolve(model: nn.Module, member: Member) -> nn.Module | torch.Tensor:
    if member.role == "parameter":
        return (
            model.get_parameter(member.name)
            if _is_parameter(model, member.name)
            else model.get_buffer(member.name)
        )
    return model.get_submodule(member.name)


def _is_parameter(model: nn.Module, name: str) -> bool:
    try:
        model.get_parameter(name)
    except AttributeError:
        return False
    return True


def group_channels(model: nn.Module, group: ChannelGroup) -> int:
    """The group's channel count; ``ValueError`` naming the member when they disagree."""
    counts = {}
    for member in group.members:
        c = _channels_of(member, resolve(model, member))
        if c is None:
            raise ValueError(f"{member.role} {member.name!r} is not a layer this role can permute")
        counts[member.name] = c
    if len(set(counts.values())) != 1:
        raise ValueError(f"channel counts differ: {counts}")
    return next(iter(counts.values()))


@torch.no_grad()
def apply_permutation(model: nn.Module, group: ChannelGroup, perm: torch.Tensor) -> None:
    """Permute every member of ``group`` in place by ``perm`` (``[C]`` int64)."""
    for member in group.members:
        obj = resolve(model, member)
        if member.role == "parameter":
            obj.copy_(obj.index_select(member.dim, perm.to(obj.device)))
            continue
        if member.role == "consumer":
            w = obj.weight
            w.copy_(w.index_select(1, perm.to(w.device)))
            continue
        rows = member.offset + perm
        span = slice(member.offset, member.offset + perm.numel())
        for attr in ("weight", "bias", "running_mean", "running_var"):
            t = getattr(obj, attr, None)
            if isinstance(t, torch.Tensor):
                t[span] = t.index_select(0, rows.to(t.device))
