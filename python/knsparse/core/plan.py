"""The contract between the stages: one frozen :class:`SparsityPlan`.

:func:`knsparse.prune` decides a k:n plan — the pattern, how conv weights are grouped, one bool
mask per layer and the channel permutation it applied first — and every later stage takes it:
:func:`knsparse.swap_modules`, :func:`knsparse.macs`, :func:`knsparse.audit`,
:func:`knsparse.export_onnx`. Those stages also accept a plain ``{layer: mask}`` dict with a
pattern; :func:`as_plan` turns either into a plan at their entry, so the pattern is parsed and
the masks are checked once, there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any

import torch

from .masks import bool_masks
from .pattern import ConvOrder, Pattern

MEMBER_ROLES = ("consumer", "producer", "channelwise", "parameter")


@dataclass(frozen=True)
class ChannelPermutation:
    """The permutation applied to one coupling group: new channel ``j`` is old channel
    ``order[j]`` in every member.

    Attributes:
        group: the group's name (``"blocks.0.mlp.fc1 -> blocks.0.mlp.fc2"``).
        order: ``C`` distinct channel indices, a permutation of ``range(C)``.
        members: ``(name, role, dim, offset)`` of every tensor owner that moved: a module
            (``consumer``: input columns; ``producer``: output rows from ``offset``;
            ``channelwise``: every per-channel tensor) or a parameter (``parameter``, along
            ``dim``).
    """

    group: str
    order: tuple[int, ...]
    members: tuple[tuple[str, str, int, int], ...]

    def __post_init__(self) -> None:
        order = tuple(int(i) for i in self.order)
        if sorted(order) != list(range(len(order))):
            raise ValueError(f"group {self.group!r}: order is not a permutation of 0..{len(order) - 1}")
        members = tuple((str(n), str(r), int(d), int(o)) for n, r, d, o in self.members)
        for name, role, _, _ in members:
            if role not in MEMBER_ROLES:
                raise ValueError(f"group {self.group!r}: member {name!r} has unknown role {role!r}")
        object.__setattr__(self, "order", order)
        object.__setattr__(self, "members", members)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready dict (:meth:`from_dict` reads it back)."""
        return {"group": self.group, "order": list(self.order), "members": [list(m) for m in self.members]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ChannelPermutation:
        try:
            return cls(str(data["group"]), tuple(data["order"]), tuple(tuple(m) for m in data["members"]))
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a channel permutation record: {data!r} ({exc})") from None


def permutations_from_json(records: Sequence[Mapping[str, Any]]) -> tuple[ChannelPermutation, ...]:
    """The plan's permutation from its JSON form (a list of :meth:`ChannelPermutation.to_dict`)."""
    if not isinstance(records, Sequence) or isinstance(records, (str, bytes)):
        raise ValueError(f"a permutation is a list of group records, got {type(records).__name__}")
    return tuple(ChannelPermutation.from_dict(r) for r in records)


@dataclass(frozen=True)
class SparsityPlan:
    """A k:n plan for a model: everything a later stage needs, read whole.

    Attributes:
        pattern: the k:n pattern every mask follows, with the conv order its groups run in
            (``pattern.conv_order``: ``"rsc"``, TensorRT's, or ``"crs"``).
        masks: read-only ``{module name: bool mask}``, each in its weight's shape.
        permutation: the channel permutations :func:`knsparse.prune` applied before choosing the
            masks (already applied to the model it returned), one per permuted coupling group;
            empty when none was.
        recipe: the prune configuration that made the plan (``PruneConfig.to_dict()``), so a
            result can be replayed; ``None`` for a plan built from a mask dict.
    """

    pattern: Pattern
    masks: Mapping[str, torch.Tensor]
    permutation: tuple[ChannelPermutation, ...] = ()
    recipe: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.pattern, Pattern):
            raise TypeError(f"pattern must be a knsparse.Pattern, got {type(self.pattern).__name__}")
        object.__setattr__(self, "masks", MappingProxyType(bool_masks(self.masks)))
        permutation = tuple(self.permutation)
        if not all(isinstance(p, ChannelPermutation) for p in permutation):
            raise TypeError("permutation must be a sequence of knsparse.core.plan.ChannelPermutation")
        object.__setattr__(self, "permutation", permutation)
        if self.recipe is not None:
            if not isinstance(self.recipe, Mapping):
                raise TypeError(
                    f"recipe must be a mapping (a config's to_dict()), got {type(self.recipe).__name__}"
                )
            object.__setattr__(self, "recipe", MappingProxyType(dict(self.recipe)))

    @property
    def conv_order(self) -> ConvOrder:
        """How conv weights are grouped (the pattern's conv order)."""
        return self.pattern.conv_order

    def __len__(self) -> int:
        return len(self.masks)

    def metadata(self) -> dict[str, Any]:
        """What travels with an exported or saved model (JSON-ready; the masks travel as the
        weights' zeros): pattern, conv order, permutation and recipe."""
        return {
            "pattern": str(self.pattern),
            "conv_order": self.pattern.conv_order,
            "layers": sorted(self.masks),
            "permutation": [p.to_dict() for p in self.permutation],
            "recipe": None if self.recipe is None else dict(self.recipe),
        }


def plan_masks(plan: SparsityPlan | Mapping[str, torch.Tensor] | Any) -> dict[str, torch.Tensor]:
    """The bool masks of a plan (or of anything with a ``plan``), or of a ``{layer: mask}`` dict
    checked as :func:`~knsparse.core.masks.bool_masks` does: for the stages that need the masks
    and no pattern (fine-tuning holds any mask fixed)."""
    plan = getattr(plan, "plan", plan)
    return dict(plan.masks) if isinstance(plan, SparsityPlan) else bool_masks(plan)


def as_plan(
    masks: SparsityPlan | Mapping[str, torch.Tensor] | Any,
    pattern: str | Pattern | None = None,
    conv_order: ConvOrder | None = None,
) -> SparsityPlan:
    """The plan a stage works from: ``masks`` as given (a :class:`SparsityPlan`, or anything
    with a ``plan`` attribute such as :class:`knsparse.pruning.prune.PruneResult`), or a plan
    built from a ``{layer: mask}`` dict with ``pattern`` (default ``"2:4"``) and ``conv_order``
    (default ``"rsc"``, or the pattern's). A ``pattern`` / ``conv_order`` that contradicts a
    given plan is a ``ValueError``: the plan's own are what every stage reads."""
    plan = getattr(masks, "plan", masks)
    if isinstance(plan, SparsityPlan):
        if pattern is not None and Pattern.parse(pattern, conv_order).kn != plan.pattern.kn:
            raise ValueError(f"pattern {str(pattern)!r} contradicts the plan's pattern {plan.pattern}")
        if conv_order is not None and conv_order != plan.conv_order:
            raise ValueError(
                f"conv_order {conv_order!r} contradicts the plan's conv_order {plan.conv_order!r}"
            )
        return plan
    if plan is None:
        raise TypeError(
            "expected a SparsityPlan or a {layer: mask} dict, got None "
            "(an unstructured prune has no k:n plan)"
        )
    return SparsityPlan(Pattern.parse(pattern if pattern is not None else "2:4", conv_order), plan)
