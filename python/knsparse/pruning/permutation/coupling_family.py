"""Channel groups from the family registry, for models torch.fx cannot trace.

Without a graph only the couplings inside the blocks that :mod:`knsparse.families` recognises
are used: MLPs (``fc1 -> act -> fc2``), attention (``qkv`` or ``v_proj`` values -> ``proj`` or
``o_proj`` within each head) and ResNet blocks (``conv1 -> bn1 -> act -> conv2`` and
``conv2 -> bn2 -> act -> conv3``). Residual streams need the graph and are not permuted here;
a block whose optional extras (normalisation, anti-aliasing, drop block) are anything but
identity is reported as skipped.
"""

from __future__ import annotations

from torch import nn

from ...integrations import families
from .groups import ELEMENTWISE_MODULES, ChannelGroup, Member, attention_group


def _plain(module: nn.Module | None) -> bool:
    return module is None or isinstance(module, ELEMENTWISE_MODULES)


def _mlp_group(name: str, m: nn.Module) -> ChannelGroup | None:
    fc1, fc2 = getattr(m, "fc1", None), getattr(m, "fc2", None)
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None
    members = [Member(f"{name}.fc2", "consumer"), Member(f"{name}.fc1", "producer")]
    reason = None
    norm = getattr(m, "norm", None)
    if isinstance(norm, nn.LayerNorm):
        members.append(Member(f"{name}.norm", "channelwise"))
    elif not _plain(norm):
        reason = f"{name}.norm is a {type(norm).__name__}, not provably per-channel"
    if not _plain(getattr(m, "act", None)):
        reason = f"{name}.act is a {type(m.act).__name__}, not provably elementwise"
    return ChannelGroup(members, skip_reason=reason, source="family")


def _conv_block_groups(name: str, m: nn.Module) -> list[ChannelGroup]:
    convs = [getattr(m, f"conv{i}", None) for i in (1, 2, 3)]
    bns = [getattr(m, f"bn{i}", None) for i in (1, 2, 3)]
    groups = []
    for i in (0, 1):
        producer, bn, consumer = convs[i], bns[i], convs[i + 1]
        if not (isinstance(producer, nn.Conv2d) and isinstance(consumer, nn.Conv2d)):
            continue
        if not isinstance(bn, nn.BatchNorm2d):
            continue
        members = [
            Member(f"{name}.conv{i + 2}", "consumer"),
            Member(f"{name}.conv{i + 1}", "producer"),
            Member(f"{name}.bn{i + 1}", "channelwise"),
        ]
        extras = ("drop_block", "aa") if i == 1 else ()
        odd = [e for e in extras if not _plain(getattr(m, e, None))]
        reason = f"{name}.{odd[0]} sits between conv{i + 2} and its input" if odd else None
        groups.append(ChannelGroup(members, skip_reason=reason, source="family"))
    return groups


def block_groups(name: str, m: nn.Module) -> list[ChannelGroup] | None:
    """The couplings inside ``m`` (named ``name``) if it is a registered attention, MLP or ResNet
    block, else ``None``."""
    if families.attention_parts(m) is not None or families.split_attention_parts(m) is not None:
        return [attention_group(name, m, source="family")]
    if families.is_mlp(m) and (mlp := _mlp_group(name, m)) is not None:
        return [mlp]
    if families.is_conv_block(m):
        return _conv_block_groups(name, m)
    return None
