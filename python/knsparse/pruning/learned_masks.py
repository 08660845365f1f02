"""Learned k:n masks: a differentiable choice among the ``C(n, k)`` candidates of every group.

As MaskLLM (Fang et al., NeurIPS 2024) does for 2:4: every group of ``n`` weights along the
reduction axis has one logit per candidate mask (the 6 ways to keep 2 of 4), initialised to
favour the one-shot mask (``prior`` times a one-hot, the rest zero). In training the layer computes
with ``W · Σ_c p_c m_c``, ``p = softmax((κ · logits + g) / τ)`` a Gumbel-softmax sample (``g``
Gumbel noise) whose temperature ``τ`` falls and logit scale ``κ`` grows over the run (both
annealed by the trainer), so the choice explores early and ends deterministic: with ``κ`` large
the noise no longer flips a group whose logits agree, and the last steps train the weights under
the mask they will keep. In eval mode the layer uses the arg-max candidate, so a validation pass
sees the hard k:n mask. The dense weights train with the logits: a pruned
entry starts at its dense value (the teacher's), so a mask that moves to it starts from the
function the dense model had there. :func:`finalize` writes ``W · m_argmax`` back as a plain
weight, k:n by construction.

Only patterns with at most :data:`MAX_CANDIDATES` candidates per group are supported (1:4, 2:4,
3:4, 4:8, ...): 8:16 would need 12 870 logits per group of 16 weights.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from ..core.masks import from_reduction_view, nm_violation, to_reduction_view
from ..core.pattern import Pattern
from ..core.plan import ChannelPermutation

MAX_CANDIDATES = 70
"""Most candidate masks per group (``C(8, 4)``: 4:8)."""


def candidate_masks(pattern: Pattern) -> torch.Tensor:
    """``[C(n, k), n]`` float 0/1: every way to keep ``k`` of ``n`` (lexicographic order).

    Raises ``ValueError`` naming the pattern when it has more than :data:`MAX_CANDIDATES`."""
    count = math.comb(pattern.n, pattern.k)
    if count > MAX_CANDIDATES:
        raise ValueError(
            f"learned masks choose among the C(n, k) candidates of a group: pattern {pattern} has "
            f"{count}, more than {MAX_CANDIDATES}; use 2:4 or 4:8, or hold the masks fixed"
        )
    out = torch.zeros(count, pattern.n)
    for row, kept in enumerate(itertools.combinations(range(pattern.n), pattern.k)):
        out[row, list(kept)] = 1.0
    return out


class SoftKN(nn.Module):
    """The parametrization ``W ↦ W · mask(logits)`` of one layer's weight.

    Args:
        prior: bool mask of the weight's shape (the one-shot mask); each group's logits favour
            the candidate that keeps most of its kept entries (lowest index on ties).
        pattern: the k:n pattern (its conv order groups conv weights).
        strength: the prior candidate's initial logit (the others start at 0).
    """

    def __init__(self, prior: torch.Tensor, pattern: Pattern, strength: float) -> None:
        super().__init__()
        self.pattern = pattern
        self.shape = tuple(prior.shape)
        groups = to_reduction_view(prior, pattern.conv_order).reshape(prior.shape[0], -1, pattern.n)
        cand = candidate_masks(pattern).to(prior.device)
        overlap = groups.to(cand.dtype) @ cand.T  # [rows, groups, C]
        best = F.one_hot(overlap.argmax(-1), cand.shape[0]).to(cand.dtype)
        self.register_buffer("candidates", cand, persistent=False)
        self.logits = nn.Parameter(strength * best)
        self.temperature = 1.0
        self.scale = 1.0

    def group_weights(self) -> torch.Tensor:
        """``[rows, groups, C]``: a Gumbel-softmax sample in training, the arg-max one-hot in eval."""
        if self.training:
            return F.gumbel_softmax(self.logits * self.scale, tau=self.temperature, dim=-1)
        return F.one_hot(self.logits.argmax(-1), self.candidates.shape[0]).to(self.logits.dtype)

    def mask(self) -> torch.Tensor:
        """The (soft or hard) mask in the weight's shape."""
        groups = self.group_weights() @ self.candidates  # [rows, groups, n]
        flat = groups.reshape(groups.shape[0], -1)
        return from_reduction_view(flat, self.shape, self.pattern.conv_order)

    @torch.no_grad()
    def hard_mask(self) -> torch.Tensor:
        """The arg-max candidate of every group as a bool mask of the weight's shape."""
        onehot = F.one_hot(self.logits.argmax(-1), self.candidates.shape[0]).to(self.candidates.dtype)
        flat = (onehot @ self.candidates).reshape(self.logits.shape[0], -1)
        return from_reduction_view(flat, self.shape, self.pattern.conv_order).bool()

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        return weight * self.mask().to(weight.dtype)


def dense_weights(
    teacher: nn.Module,
    names: Sequence[str],
    shapes: Mapping[str, torch.Size],
    permutation: Sequence[ChannelPermutation] = (),
) -> dict[str, torch.Tensor]:
    """The teacher's weight of every layer in ``names``, with the channel permutations the plan
    applied to the student (consumers: input columns; producers: output rows from their offset),
    so entry ``(i, j)`` is the dense value of the student's entry ``(i, j)``.

    Raises ``ValueError`` naming the layer when the teacher has no module of that name whose
    weight has the student's shape."""
    modules = dict(teacher.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name in names:
        weight = getattr(modules.get(name), "weight", None)
        if not isinstance(weight, torch.Tensor) or tuple(weight.shape) != tuple(shapes[name]):
            found = "no such module" if name not in modules else f"weight {getattr(weight, 'shape', None)}"
            raise ValueError(
                f"learned masks start every pruned entry at its dense value: layer {name!r} "
                f"(weight {tuple(shapes[name])}) has no match in the teacher ({found})"
            )
        w = weight.detach().clone()
        for record in permutation:
            order = torch.tensor(record.order, device=w.device)
            for member, role, _, offset in record.members:
                if member != name:
                    continue
                if role == "consumer":
                    w = w.index_select(1, order)
                elif role == "producer":
                    w[offset : offset + order.numel()] = w.index_select(0, offset + order)
        out[name] = w
    return out


def attach(
    student: nn.Module,
    masks: Mapping[str, torch.Tensor],
    dense: Mapping[str, torch.Tensor],
    pattern: Pattern,
    strength: float,
) -> dict[str, SoftKN]:
    """Parametrize the weight of every layer in ``masks`` as :class:`SoftKN` (in place): the
    underlying dense weight is the student's where the mask keeps, ``dense``'s where it prunes."""
    modules = dict(student.named_modules())
    soft: dict[str, SoftKN] = {}
    for name, mask in masks.items():
        module = modules[name]
        with torch.no_grad():
            module.weight.copy_(torch.where(mask.to(module.weight.device), module.weight, dense[name]))
        soft[name] = SoftKN(mask.to(module.weight.device), pattern, strength)
        parametrize.register_parametrization(module, "weight", soft[name])
    return soft


def set_schedule(soft: Mapping[str, SoftKN], temperature: float, scale: float) -> None:
    """The Gumbel-softmax temperature ``τ`` and logit scale ``κ`` of every learned mask."""
    for s in soft.values():
        s.temperature, s.scale = temperature, scale


def annealed(step: int, total: int, start: float, end: float) -> float:
    """Temperature at ``step`` of ``total``: geometric from ``start`` to ``end``."""
    frac = min(step / max(total - 1, 1), 1.0)
    return start * (end / start) ** frac


@torch.no_grad()
def finalize(student: nn.Module, soft: Mapping[str, SoftKN]) -> dict[str, torch.Tensor]:
    """Replace every parametrized weight by ``W · m_argmax`` (a plain parameter, in place);
    returns the hard masks ``{layer: bool mask}``."""
    modules = dict(student.named_modules())
    out: dict[str, torch.Tensor] = {}
    for name, s in soft.items():
        hard = s.hard_mask()
        violation = nm_violation(hard, s.pattern)
        if violation is not None:  # arg-max of k:n candidates is k:n; a failure here is a bug
            raise RuntimeError(f"layer {name!r}: learned mask {violation}")
        module = modules[name]
        parametrize.remove_parametrizations(module, "weight", leave_parametrized=False)
        module.weight.mul_(hard.to(module.weight.dtype))
        out[name] = hard
    return out
