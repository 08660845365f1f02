"""``permute(model, pattern)``: find channel groups, search their permutations, apply them.

Every group's permutation is searched on the stacked input weights of its consumers (the
layers that will be k:n masked), each scaled by what it keeps now, and applied to all its
members, so the model computes the same function. A group is left alone, with the reason in
the report, when it cannot be proven safe (see :mod:`.coupling_fx`), when its channels cannot
be tiled by ``n``, or when no permutation found raises the fraction its consumers keep on
average (a residual stream read by many layers may trade a little in a few of them: the
report names them).
"""

from __future__ import annotations

import copy
import math
import time
from dataclasses import dataclass, field

import torch
from torch import nn

from ...core.checks import check_flag, check_module, check_number
from ...core.layers import placement_reasons, shared_tensors
from ...core.masks import check_groupable
from ...core.pattern import ConvOrder, Pattern
from ...core.plan import ChannelPermutation
from ...utils import distributed
from ...utils.batches import Batch, model_batches, model_device, output_tensors
from ...utils.modes import evaluation
from .coupling_blocks import blockwise_groups
from .coupling_fx import fx_groups
from .groups import ChannelGroup, GroupList, apply_permutation, group_channels
from .objective import efficacy, kept_score, optimal_kept, search_matrix
from .stripe_search import search_matrices

_TINY = 1e-30


@dataclass
class GroupReport:
    """What happened to one channel group. Kept scores are sums of ``|w|`` over the group's
    consumers after k:n masking; ``layers`` maps each consumer to ``(before, after)``.

    A group is permuted when its consumers keep more on average, each consumer counted by the
    fraction of its own kept score it gains (:attr:`relative_gain` > 0). A permutation shared by
    many layers (a residual stream) may lower what a few of them keep: :attr:`losers`.
    """

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
    applied: ChannelPermutation | None = None
    """The permutation written into the model (indices and members), when :attr:`permuted`."""

    @property
    def relative_gain(self) -> float:
        """Mean over the consumers of ``after / before - 1`` (0 with no consumers scored)."""
        ratios = [a / b - 1 for b, a in self.layers.values() if b > 0]
        return sum(ratios) / len(ratios) if ratios else 0.0

    @property
    def losers(self) -> list[str]:
        """Consumers that keep less after the permutation than before."""
        return [name for name, (b, a) in self.layers.items() if a < b]


@dataclass
class PermutationReport:
    model: nn.Module
    pattern: str
    groups: list[GroupReport]
    trace_error: str | None = None

    @property
    def permuted(self) -> list[GroupReport]:
        return [g for g in self.groups if g.permuted]

    def applied(self) -> tuple[ChannelPermutation, ...]:
        """What was written into the model, one record per permuted group (the plan's field)."""
        return tuple(g.applied for g in self.groups if g.applied is not None)

    def table(self) -> str:
        """A markdown table, one row per group."""
        lines = [
            "| group | channels | kept before | kept after | efficacy | status |",
            "| --- | ---: | ---: | ---: | ---: | --- |",
        ]
        for g in self.groups:
            traded = f" ({len(g.losers)} of {len(g.layers)} layers keep less)" if g.losers else ""
            status = f"permuted{traded}" if g.permuted else f"skipped: {g.skip_reason}"
            lines.append(
                f"| {g.name} | {g.channels or ''} | {g.kept_before:.4g} | {g.kept_after:.4g} | "
                f"{g.efficacy:.1%} | {status} |"
            )
        return "\n".join(lines)


def find_groups(model: nn.Module) -> GroupList:
    """Channel groups from torch.fx, or block by block (:mod:`.coupling_blocks`) when the whole
    model cannot be traced."""
    check_module(model)
    found = fx_groups(model)
    if found.trace_error is not None:
        found.groups = blockwise_groups(model)
    return found


def prepare_group(
    model: nn.Module, group: ChannelGroup, report: GroupReport, pattern: Pattern
) -> dict[str, torch.Tensor] | None:
    """The group's consumer search matrices by name, or ``None`` (with ``report.skip_reason``)
    when it cannot move."""
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
    for name, w in weights.items():
        check_groupable(w.shape, pattern, name)
    return {name: search_matrix(w, pattern.conv_order, name) for name, w in weights.items()}


def scaled_stack(matrices: dict[str, torch.Tensor], pattern: Pattern) -> torch.Tensor:
    """The group's search matrix: its consumers' matrices, each divided by what it keeps now,
    stacked along the rows."""
    return torch.cat([m / max(kept_score(m, pattern), _TINY) for m in matrices.values()])


def judge_group(
    matrices: dict[str, torch.Tensor], perm: torch.Tensor, report: GroupReport, pattern: Pattern
) -> torch.Tensor | None:
    """Score the searched ``perm`` into ``report``; ``None`` when it does not pay."""
    before = {name: kept_score(m, pattern) for name, m in matrices.items()}
    after = {name: kept_score(m, pattern, perm.to(m.device)) for name, m in matrices.items()}
    report.layers = {name: (before[name], after[name]) for name in matrices}
    report.kept_before, report.kept_after = sum(before.values()), sum(after.values())
    report.kept_optimal = sum(optimal_kept(m, pattern) for m in matrices.values())
    report.efficacy = efficacy(report.kept_before, report.kept_after, report.kept_optimal)
    if report.relative_gain <= 0:
        report.skip_reason = "no permutation found raises the fraction its layers keep"
        report.kept_after, report.efficacy = report.kept_before, 0.0
        return None
    return perm


def placement_skip(
    model: nn.Module, group: ChannelGroup, placement: dict[str, str], shared: dict[str, list[str]]
) -> str | None:
    """Why ``group`` must not move because of where its members sit (``placement`` and
    ``shared`` from :mod:`knsparse.core.layers`): a layer its parent reads directly or registered
    twice, or a tensor sharing storage with another name (a tied weight would follow the
    permutation there too and change the function)."""
    for member in group.members:
        if member.name in placement:
            return f"{member.name}: {placement[member.name]}"
        if member.role == "parameter":
            names = [member.name]
        else:
            module = model.get_submodule(member.name)
            own = [*module.named_parameters(recurse=False), *module.named_buffers(recurse=False)]
            names = [f"{member.name}.{n}" for n, _ in own]
        for name in names:
            if name in shared:
                return f"{name} shares its storage with {', '.join(shared[name])} (tied weights)"
    return None


def _search_groups(
    model: nn.Module,
    groups: list[ChannelGroup],
    pattern: Pattern,
    search_kwargs: dict,
    progress: bool,
    skip: dict[int, str],
) -> tuple[list[GroupReport], list[torch.Tensor | None]]:
    """Every group's report and permutation (``None``: leave it alone), all searched together
    (:func:`~.stripe_search.search_matrices` batches blocks of equal shape across groups) on
    the weights as they are before any permutation is applied; ``skip`` gives the reason a
    group must not move. Each group's search matrix stacks its consumers, each scaled by what
    it keeps now, so one large layer cannot buy its gain with a small layer's loss. Under
    torch.distributed rank ``r`` searches groups ``r, r+N, ...`` and the results are gathered
    on every rank. ``report.seconds`` is the group's share of the search time, by its size."""
    start = time.perf_counter()
    search_kwargs = dict(search_kwargs)
    budget = search_kwargs.pop("time_budget_s")
    found: dict[int, tuple[GroupReport, torch.Tensor | None]] = {}
    todo: list[tuple[int, dict[str, torch.Tensor]]] = []
    for i in distributed.shard(range(len(groups))):
        group = groups[i]
        report = GroupReport(group.name, group.consumers, group.source, skip_reason=skip.get(i))
        found[i] = (report, None)
        matrices = None if report.skip_reason else prepare_group(model, group, report, pattern)
        if matrices is not None:
            todo.append((i, matrices))
    stacked = [scaled_stack(matrices, pattern) for _, matrices in todo]
    deadline = math.inf if budget is None else start + budget * len(todo)
    iters, rounds = split_budget([m.numel() for m in stacked], search_kwargs.pop("max_iters"))
    perms = search_matrices(
        stacked,
        pattern,
        segments=[groups[i].block for i, _ in todo],
        deadline=deadline,
        max_iters=iters,
        max_rounds=rounds,
        progress=progress,
        **search_kwargs,
    )
    elapsed = time.perf_counter() - start
    work = sum(m.numel() for m in stacked)
    for (i, matrices), m, (perm, _) in zip(todo, stacked, perms, strict=True):
        report = found[i][0]
        report.seconds = elapsed * m.numel() / work
        kept = judge_group(matrices, perm, report, pattern)
        found[i] = (report, None if kept is None else kept.cpu())
    for part in distributed.all_gather_object(found):
        found.update(part)
    return [found[i][0] for i in range(len(groups))], [found[i][1] for i in range(len(groups))]


# Search-matrix size (rows x channels) that gets ``max_iters`` tabu steps per block: ViT-B/16's
# MLP (fc2's 768 rows x 3072 channels). The cost of a tabu step or a swap round is about
# proportional to a group's size.
_REFERENCE_SIZE = 768 * 3072
# Improving swap rounds per block a group of the reference size may make (unbounded below it).
_REFERENCE_ROUNDS = 16
# Fewer tabu steps per block than this are not worth a walk: the group gets none.
_MIN_STEPS = 20


def split_budget(sizes: list[int], max_iters: int) -> tuple[list[int], list[float]]:
    """Tabu steps and swap rounds per block for groups whose search matrices have ``sizes``
    (rows x channels) elements: the model's work is split by size, so a group of
    :data:`_REFERENCE_SIZE` gets ``max_iters`` steps, a smaller one proportionally more (at
    most ``3 * max_iters``), a larger one fewer (none below :data:`_MIN_STEPS`); swap rounds are
    capped only for groups larger than the reference (at least 1), so that no single huge
    group (a transformer's residual stream read by every block, whose efficacy stays low
    whatever it is given) takes most of the time. Deterministic: counts, not seconds."""
    iters = [min(3 * max_iters, max_iters * _REFERENCE_SIZE // size) for size in sizes]
    iters = [0 if steps < _MIN_STEPS else steps for steps in iters]
    rounds = [
        math.inf if size <= _REFERENCE_SIZE else max(1, _REFERENCE_ROUNDS * _REFERENCE_SIZE // size)
        for size in sizes
    ]
    return iters, rounds


def _outputs(model: nn.Module, batch: Batch) -> list[torch.Tensor]:
    with torch.no_grad():
        out = batch(model)
    return [t.detach().clone() for t in output_tensors(out)]


def permute(
    model: nn.Module,
    pattern: str | Pattern,
    calib: object = None,
    inplace: bool = False,
    *,
    conv_order: ConvOrder | None = None,
    seed: int = 0,
    max_iters: int = 30,
    block_stripes: int = 64,
    windows: bool = False,
    passes: int = 1,
    time_budget_s: float | None = None,
    progress: bool = False,
) -> PermutationReport:
    """Permute channels of ``model`` so that k:n masks keep more magnitude, function unchanged.

    Args:
        model: any ``nn.Module``; traced with torch.fx, else its blocks matched by :mod:`knsparse.families`.
        pattern: the k:n pattern the consumers will be masked with (``"2:4"``, ``"8:16"``...).
        calib: optional calibration batches; the first one checks that outputs are unchanged
            (the model is restored and ``RuntimeError`` raised if they are not).
        inplace: permute ``model`` itself; default a deep copy (``report.model``), as
            :func:`knsparse.prune` does.
        conv_order: conv grouping of the masks, for a pattern given without one
            (see :mod:`knsparse.core.pattern`).
        seed, block_stripes, windows, passes: as in :func:`~.stripe_search.search`. All
            groups are searched together: blocks of equal shape, from any group, in one batch
            on the model's device. Window rounds are off by default: on ResNet-50 they add
            about 0.03 points of efficacy for 4x the time (``bench/bench_permute.py --models``).
            Blocks of 64 stripes (256 channels for 2:4): on ViT-B/16's MLP groups swap rounds
            over them keep more (16.1% efficacy) than 100 tabu steps over blocks of 32 (16.0%)
            in about 3/4 of the time.
        max_iters: tabu steps per block for a group the size of ViT-B/16's MLP (768 x 3072
            search matrix); other groups get steps in inverse proportion to their size, at
            most ``3 * max_iters``, none below 20 (see :func:`split_budget`).
        time_budget_s: wall-clock seconds per group, pooled over the model (``None``: no
            limit); every batch still makes one swap round.
        progress: show a tqdm bar over the batches.

    Returns:
        A :class:`PermutationReport` with the (permuted) model and one row per group.
    """
    check_module(model, meta="refuse")
    check_flag(inplace, "inplace")
    check_flag(windows, "windows")
    pattern = Pattern.parse(pattern, conv_order)
    check_number(seed, "seed", integer=True)
    check_number(max_iters, "max_iters", low=0, integer=True)
    check_number(block_stripes, "block_stripes", low=2, integer=True)
    check_number(passes, "passes", low=1, integer=True)
    if time_budget_s is not None:
        check_number(time_budget_s, "time_budget_s", low=0.0)
    if not inplace:
        model = copy.deepcopy(model)
    search_kwargs = {
        "seed": seed,
        "max_iters": max_iters,
        "block_stripes": block_stripes,
        "windows": windows,
        "passes": passes,
        "time_budget_s": time_budget_s,
    }
    backup = {k: v.detach().clone() for k, v in model.state_dict().items()}
    try:
        return permute_unguarded(model, pattern, calib, search_kwargs, progress)
    except BaseException:
        model.load_state_dict(backup)  # all or nothing: no half-permuted model
        raise


def permute_unguarded(
    model: nn.Module, pattern: Pattern, calib: object, search_kwargs: dict[str, object], progress: bool
) -> PermutationReport:
    """:func:`permute`'s work on ``model`` itself, with checked arguments, and no rollback: a
    caller that holds its own snapshot of the model (:func:`knsparse.prune`) restores it on an
    error instead of paying for a second one."""
    with evaluation(model):
        probe = next(model_batches(calib, model_device(model))) if calib is not None else None
        reference = _outputs(model, probe) if probe is not None else None
        found = find_groups(model)
        placement, shared = placement_reasons(model), shared_tensors(model)
        skip = {
            i: reason
            for i, group in enumerate(found.groups)
            if (reason := group.skip_reason or placement_skip(model, group, placement, shared))
        }
        reports, perms = _search_groups(model, found.groups, pattern, search_kwargs, progress, skip)
        for group, report, perm in zip(found.groups, reports, perms, strict=True):
            if perm is not None:
                apply_permutation(model, group, perm.to(model_device(model)))
                report.permuted = True
                members = tuple((m.name, m.role, m.dim, m.offset) for m in group.members)
                report.applied = ChannelPermutation(report.name, tuple(perm.tolist()), members)
        if probe is not None:
            _check_unchanged(model, probe, reference)
    return PermutationReport(model, str(pattern), reports, found.trace_error)


def _check_unchanged(model: nn.Module, probe: Batch, reference: list[torch.Tensor]) -> None:
    for want, got in zip(reference, _outputs(model, probe), strict=True):
        err = (want - got).abs().max().item()
        scale = want.abs().max().item()
        if err > 1e-4 * max(scale, 1.0):
            raise RuntimeError(
                f"channel permutation changed the model's output by {err:.3g} (scale {scale:.3g}); "
                "the model was restored. Please report the model: a coupling was misjudged."
            )
