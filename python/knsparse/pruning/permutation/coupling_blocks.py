"""Channel groups block by block, for models torch.fx cannot trace as a whole.

Hugging Face models, for one, fail to trace at the top (input checks, output dataclasses)
while most of their blocks trace fine. Each submodule is handled by the first rule that
applies: a block registered in :mod:`knsparse.families` contributes its known couplings, a
module that traces contributes the groups of its own graph (its inputs and outputs are frozen,
so only couplings inside it move), and any other module is split into its children.
"""

from __future__ import annotations

from dataclasses import replace

from torch import nn

from .coupling_family import block_groups
from .coupling_fx import fx_groups
from .groups import ChannelGroup, Member


def _prefixed(group: ChannelGroup, prefix: str) -> ChannelGroup:
    members = [Member(f"{prefix}{m.name}", m.role, m.dim, m.offset) for m in group.members]
    return replace(group, members=members, source="fx-block")


def blockwise_groups(model: nn.Module, name: str = "") -> list[ChannelGroup]:
    """Groups of ``model`` (named ``name`` inside the model being permuted), block by block."""
    registered = block_groups(name, model)
    if registered is not None:
        return registered
    prefix = f"{name}." if name else ""
    if name:  # the whole model is known not to trace
        found = fx_groups(model)
        if found.trace_error is None:
            return [_prefixed(g, prefix) for g in found.groups]
    return [g for child, m in model.named_children() for g in blockwise_groups(m, f"{prefix}{child}")]
