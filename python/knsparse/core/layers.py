"""Which modules of a model are prunable, and their weights as 2-D reduction views.

A prunable layer is an ``nn.Linear`` or an ungrouped ``nn.Conv2d`` (``groups == 1``) with zero
padding: those are the layers a k:n sparse GEMM executes. Grouped and depthwise convolutions have
no shared reduction axis across output channels and are left alone. A layer's place in the model
can rule it out too: a parent that reads its weight directly instead of calling it
(``nn.MultiheadAttention.out_proj``), a layer registered under several names, or a weight tied to
another tensor — swapping, masking or permuting one name would silently change the other. This
module is the one place those rules live; masking, pruning, swapping, permuting and reporting
all ask it.
"""

from __future__ import annotations

import contextlib
import math
from collections import defaultdict

import torch
from torch import nn

from .checks import check_module
from .masks import check_groupable, is_nm, nm_violation, to_reduction_view
from .pattern import ConvOrder, Pattern


def ineligibility(module: nn.Module) -> str | None:
    """Why a k:n sparse GEMM cannot execute ``module``, or ``None`` when it can."""
    if isinstance(module, nn.Linear):
        return None
    if not isinstance(module, nn.Conv2d):
        return f"{type(module).__name__} is not a Linear or Conv2d layer"
    if module.groups != 1:
        kind = "depthwise" if module.groups == module.in_channels else "grouped"
        return f"{kind} convolution (groups={module.groups}) is not eligible for k:n sparse GEMM"
    if module.padding_mode != "zeros":
        return f"padding_mode={module.padding_mode!r} is not supported (zeros only)"
    return None


# Parents that read the weights of their child layers directly instead of calling them
# (F.multi_head_attention_forward takes out_proj.weight; the encoder layer's fast path takes
# linear1/linear2 weights): a swapped child would break the parent, a masked one is bypassed.
_READS_CHILD_WEIGHTS = (nn.MultiheadAttention, nn.TransformerEncoderLayer)


def shared_tensors(model: nn.Module) -> dict[str, list[str]]:
    """``{tensor name: the other names whose tensors share its storage}`` over every parameter
    and buffer of ``model`` (a tensor registered twice, a tied weight, a view of another)."""
    named = list(model.named_parameters(remove_duplicate=False))
    named += list(model.named_buffers(remove_duplicate=False))
    owners: dict[object, list[str]] = defaultdict(list)
    for name, t in named:
        key: object = id(t)
        if t.device.type != "meta" and t.numel() > 0:
            with contextlib.suppress(RuntimeError, NotImplementedError):  # subclasses without storage
                key = (t.device, t.untyped_storage().data_ptr())
        owners[key].append(name)
    return {n: [o for o in names if o != n] for names in owners.values() if len(names) > 1 for n in names}


def placement_reasons(model: nn.Module) -> dict[str, str]:
    """``{module name: why}`` for every Linear / Conv2d name whose place in ``model`` rules it
    out of k:n sparsity and channel permutation (every name of a module registered twice)."""
    names_of: dict[int, list[str]] = defaultdict(list)
    placed: dict[str, tuple[nn.Module, nn.Module]] = {}
    for parent_name, parent in model.named_modules(remove_duplicate=False):
        for child_name, child in parent._modules.items():  # named_children() hides second names
            name = f"{parent_name}.{child_name}" if parent_name else child_name
            if isinstance(child, (nn.Linear, nn.Conv2d)):
                names_of[id(child)].append(name)
                placed[name] = (parent, child)
    shared = shared_tensors(model)
    reasons: dict[str, str] = {}
    for name, (parent, module) in placed.items():
        aliases = names_of[id(module)]
        own = (f"{name}.weight", f"{name}.bias")
        tied = [f"{t} is tied to {', '.join(shared[t])}" for t in own if t in shared]
        if isinstance(parent, _READS_CHILD_WEIGHTS):
            reasons[name] = (
                f"{type(parent).__name__} reads this layer's weight directly instead of calling it "
                "(a sparse or permuted twin would be bypassed or break it)"
            )
        elif len(aliases) > 1:
            reasons[name] = f"one module registered under several names ({', '.join(aliases)})"
        elif tied:
            reasons[name] = f"shared weights: {'; '.join(tied)}"
    return reasons


def layer_reasons(model: nn.Module) -> dict[str, str | None]:
    """``{name: why not, or None}`` for every Linear / Conv2d of ``model`` (``named_modules``
    order): the module's kind (:func:`ineligibility`) first, then its place in the model."""
    placement = placement_reasons(model)
    return {
        name: ineligibility(m) or placement.get(name)
        for name, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d))
    }


def is_prunable(module: nn.Module) -> bool:
    """True for ``nn.Linear`` and for zero-padded ``nn.Conv2d`` with ``groups == 1`` (the module
    alone; :func:`prunable_layers` also applies the model-placement rules)."""
    return ineligibility(module) is None


def prunable_layers(model: nn.Module) -> dict[str, nn.Module]:
    """``{qualified module name: module}`` for every prunable layer, in ``named_modules`` order."""
    check_module(model)
    reasons = layer_reasons(model)
    return {name: m for name, m in model.named_modules() if name in reasons and reasons[name] is None}


def shape_ineligibility(name: str, module: nn.Module, pattern: Pattern | None) -> str | None:
    """Why ``module`` cannot carry ``pattern`` (its kind, or a reduction axis the groups cannot
    tile in the pattern's conv order), or ``None``; with ``pattern=None`` (unstructured masks) only
    its kind counts. Shapes only."""
    reason = ineligibility(module)
    if reason or pattern is None:
        return reason
    try:
        check_groupable(module.weight.shape, pattern, name)
    except ValueError as err:
        return str(err)
    return None


def swap_ineligibility(name: str, module: nn.Module, mask: torch.Tensor, pattern: Pattern) -> str | None:
    """Why a sparse module cannot replace ``module`` with ``mask`` (a bool tensor of the weight's
    shape), or ``None``: :func:`shape_ineligibility`, then :func:`mask_ineligibility`."""
    return shape_ineligibility(name, module, pattern) or nm_violation(mask, pattern)


def pattern_layers(model: nn.Module, pattern: Pattern | None) -> tuple[dict[str, nn.Module], dict[str, str]]:
    """The prunable layers whose weight shape can carry ``pattern`` (groups along the reduction
    axis in the pattern's conv order; any prunable layer for ``None``), and ``{name: why not}`` for every
    other Linear / Conv2d (its kind, its place in the model, its shape)."""
    check_module(model)
    layers: dict[str, nn.Module] = {}
    skipped: dict[str, str] = {}
    reasons = layer_reasons(model)
    for name, module in model.named_modules():
        if name not in reasons:
            continue
        reason = reasons[name] or shape_ineligibility(name, module, pattern)
        if reason:
            skipped[name] = reason
        else:
            layers[name] = module
    return layers, skipped


def reduction_weight(module: nn.Module, conv_order: ConvOrder = "rsc") -> torch.Tensor:
    """The layer's weight as ``[out, K]``: Linear ``[out, in]``; Conv2d ``[Cout, R*S*Cin]`` (rsc)
    or ``[Cout, Cin*R*S]`` (crs). Detached; a view where the layout allows."""
    return to_reduction_view(module.weight.detach(), conv_order)


def masks_from_zeros(model: nn.Module, pattern: str | Pattern | None = None) -> dict[str, torch.Tensor]:
    """``{layer: weight != 0}`` read from the zeros of a model pruned and kept as plain weights:
    with ``pattern``, every ``nn.Linear`` / ``nn.Conv2d`` whose weight holds zeros and is k:n
    along its reduction axis; without, every prunable layer (:func:`prunable_layers`) holding a
    zero. The one place knsparse reads masks from zeros; a stage given a plan never does."""
    check_module(model)
    if pattern is None:
        candidates = prunable_layers(model)
    else:
        pattern = Pattern.parse(pattern)
        candidates = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Linear, nn.Conv2d))}
    return {
        name: (m.weight != 0).detach()
        for name, m in candidates.items()
        if bool((m.weight == 0).any()) and (pattern is None or is_nm(m.weight, pattern))
    }


def layer_kind(module: nn.Module) -> str | None:
    """``"linear"`` / ``"conv"`` for a module that multiplies by a weight the way a Linear or a
    Conv2d does (knsparse's sparse modules included), else ``None``: what MACs are counted for."""
    if hasattr(module, "in_features") and hasattr(module, "out_features"):
        return "linear"
    if hasattr(module, "in_channels") and hasattr(module, "kernel_size"):
        return "conv"
    return None


def weight_macs(kind: str, module: nn.Module, inputs: torch.Tensor, output: torch.Tensor) -> int:
    """Multiply-accumulates of one call of a :func:`layer_kind` layer on ``inputs`` giving
    ``output`` (the whole batch): Linear ``rows * in * out``; Conv2d ``(Cin / groups) * R * S``
    per output element. Biases are not counted."""
    if kind == "linear":
        return (inputs.numel() // module.in_features) * module.in_features * module.out_features
    groups = getattr(module, "groups", 1)  # SparseConv2d is always ungrouped
    return output.numel() * (module.in_channels // groups) * math.prod(module.kernel_size)
