"""``permute(model, pattern)``: find channel groups, search their permutations, apply them.

Every group's permutation is searched on the stacked input weights of its consumers (the
layers that will be k:n masked) and applied to all its members, so the model computes the
same function. A group is left alone, with the reason in the report, when it cannot be
proven safe (see :mod:`.coupling_fx`), when its channels cannot be tiled by ``n``, or when
the best shared permutation would make any one of its layers keep less than it does now.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field

import torch
from torch import nn
from tqdm.auto import tqdm

from ..batches import input_batches, model_device
from ..masks import ConvOrder
from ..modes import evaluation
from ..pattern import Pattern
from .coupling_family import family_groups
from .coupling_fx import fx_groups
from .groups import ChannelGroup, GroupList, apply_permutation, group_channels
from .objective import efficacy, kept_score, search_matrix
from .stripe_search import search


@dataclass
class GroupReport:
    """What happened to one channel group. Kept scores are sums of ``|w|`` over the group's
    consumers after k:n masking; ``layers`` maps each consumer to ``(before, after)``."""

    name: str
    consumers: list[str]
    source: str
    channels: int | None = None
    permuted: bool = False
    skip_reason: str | None = None
    kept_before: float = 0.0
    kept_after: float = 0.0
    kept_optimal: float = 0.0
    efficacy: float = 0.0
    layers: dict[str, tuple[float, float]] = field(default_factory=dict)
    seconds: float = 0.0


@dataclass
class PermutationReport:
    model: nn.Module
    pattern: str
    groups: list[GroupReport]
    trace_error: str | None = None

    @property
    def permuted(self) -> list[GroupReport]:
        return [g for g in self.groups if g.permuted]

    def table(self) -> str:
        """A markdown table, one row per group."""
        lines = [
            "| group | channels | kept before | kept after | efficacy | status |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for g in self.groups:
            status = "permuted" if g.permuted else f"skipped: {g.skip_reason}"
            lines.append(
                f"| {g.name} | {g.channels or ''} | {g.kept_before:.4g} | {g.kept_after:.4g} | "
                f"{g.efficacy:.1%} | {status} |"
            )
        return "\n".join(lines)


def find_groups(model: nn.Module) -> GroupList:
    """Channel groups from torch.fx, or from the family registry's blocks when tracing fails."""
    found = fx_groups(model)
    if found.trace_error is not None:
        found.groups = family_groups(model)
    return found


def _search_group(
    model: nn.Module, group: ChannelGroup, report: GroupReport, pattern: Pattern, search_kwargs: dict
) -> torch.Tensor | None:
    """The group's permutation, or ``None`` (with ``report.skip_reason``) to leave it alone."""
    try:
        channels = group_channels(model, group)
    except ValueError as err:
        report.skip_reason = str(err)
        return None
    report.channels = channels
    block = group.block or channels
    if block % pattern.n:
        what = "channels per head" if group.block else "channels"
        report.skip_reason = f"{block} {what}, not a multiple of n={pattern.n}"
        return None
    weights = {name: model.get_submodule(name).weight.detach() for name in group.consumers}
    result = search(
        list(weights.values()), pattern, segment=group.block, names=list(weights), **search_kwargs
    )
    perm = result.perm
    report.kept_optimal = result.kept_optimal
    for name, w in weights.items():
        m = search_matrix(w, search_kwargs["conv_order"], name)
        before, after = kept_score(m, pattern), kept_score(m, pattern, perm.to(m.device))
        report.layers[name] = (before, after)
        report.kept_before += before
        report.kept_after += after
    report.efficacy = efficacy(report.kept_before, report.kept_after, report.kept_optimal)
    losers = [name for name, (b, a) in report.layers.items() if a < b]
    if losers:
        report.skip_reason = f"the best shared permutation keeps less in {', '.join(losers)}"
    elif torch.equal(perm.cpu(), torch.arange(channels)):
        report.skip_reason = "no permutation keeps more than the current order"
    if report.skip_reason:
        report.kept_after, report.efficacy = report.kept_before, 0.0
        return None
    return perm


def _outputs(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    with torch.no_grad():
        out = model(x)
    items = out if isinstance(out, (tuple, list)) else [out]
    return [t.detach().clone() for t in items if isinstance(t, torch.Tensor)]


def permute(
    model: nn.Module,
    pattern: str | Pattern,
    calib: object = None,
    inplace: bool = True,
    *,
    conv_order: ConvOrder = "rsc",
    seed: int = 0,
    max_iters: int = 100,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> PermutationReport:
    """Permute channels of ``model`` so that k:n masks keep more magnitude, function unchanged.

    Args:
        model: any ``nn.Module``; traced with torch.fx, else its blocks matched by :mod:`knsparse.families`.
        pattern: the k:n pattern the consumers will be masked with (``"2:4"``, ``"8:16"``...).
        calib: optional calibration batches; the first one checks that outputs are unchanged
            (the model is restored and ``RuntimeError`` raised if they are not).
        inplace: permute ``model`` itself, else a deep copy (``report.model``).
        conv_order: conv grouping of the masks (see :mod:`knsparse.masks`).
        seed, max_iters: passed to :func:`~.stripe_search.search` for every group.
        time_budget_s: wall-clock seconds per group (``None``: no limit).
        progress: show a tqdm bar over the groups.

    Returns:
        A :class:`PermutationReport` with the (permuted) model and one row per group.
    """
    pattern = Pattern.parse(pattern)
    if not inplace:
        model = copy.deepcopy(model)
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    with evaluation(model):
        try:
            probe = next(input_batches(calib, model_device(model))) if calib is not None else None
            reference = _outputs(model, probe) if probe is not None else None
            found = find_groups(model)
            search_kwargs = {
                "conv_order": conv_order,
                "seed": seed,
                "max_iters": max_iters,
                "time_budget_s": time_budget_s,
            }
            reports = []
            for group in tqdm(found.groups, desc="permute", disable=not progress):
                start = time.perf_counter()
                report = GroupReport(group.name, group.consumers, group.source, skip_reason=group.skip_reason)
                if report.skip_reason is None:
                    perm = _search_group(model, group, report, pattern, search_kwargs)
                    if perm is not None:
                        apply_permutation(model, group, perm)
                        report.permuted = True
                report.seconds = time.perf_counter() - start
                reports.append(report)
            if probe is not None:
                _check_unchanged(model, probe, reference)
        except BaseException:
            model.load_state_dict(backup)  # all or nothing: no half-permuted model
            raise
    return PermutationReport(model, str(pattern), reports, found.trace_error)


def _check_unchanged(model: nn.Module, probe: torch.Tensor, reference: list[torch.Tensor]) -> None:
    for want, got in zip(reference, _outputs(model, probe), strict=True):
        err = (want - got).abs().max().item()
        scale = want.abs().max().item()
        if err > 1e-4 * max(scale, 1.0):
            raise RuntimeError(
                f"channel permutation changed the model's output by {err:.3g} (scale {scale:.3g}); "
                "the model was restored. Please report the model: a coupling was misjudged."
            )
