"""Channel groups from a torch.fx trace.

The traced graph is interpreted abstractly: every tensor is either unrelated to channel
permutation, a model parameter, or a view of an *activation space* with a known channel
dimension. Linear / Conv2d layers end one space (their input columns are consumers) and
start another (their output rows are producers); per-channel modules, elementwise functions,
pooling and shape bookkeeping that keeps the channel dimension intact pass the space on
(modules without state at every call: torchvision's ResNet calls one ``relu`` three times;
``F.layer_norm`` over the channels adds its affine tensors to the space); an
addition or multiplication of two spaces (a residual) merges them into one, so they share a
permutation; a parameter added into a space joins it. Anything else that touches a space —
an unknown module or function, a reshape that mixes channels, the model's inputs and
outputs — freezes the space with the reason, so it is never permuted.

timm-shaped attention modules are leaves of the trace: to the graph they read their input
through ``qkv`` and write through ``proj``; their value/``proj`` coupling inside every head
becomes a group of its own.
"""

from __future__ import annotations

import operator
from collections import Counter
from dataclasses import dataclass, field, replace

import torch
import torch.nn.functional as F
from torch import fx, nn

from ...integrations.families import attention_parts, is_norm_act, is_plain_conv
from .groups import ELEMENTWISE_MODULES, ChannelGroup, GroupList, Member, attention_group

_ELEMENTWISE_FUNCTIONS = {
    F.relu,
    F.relu6,
    F.gelu,
    F.silu,
    F.hardswish,
    F.hardsigmoid,
    F.leaky_relu,
    F.elu,
    F.mish,
    F.dropout,
    torch.relu,
    torch.sigmoid,
    torch.tanh,
}
_ELEMENTWISE_METHODS = {"relu", "relu_", "sigmoid", "tanh", "contiguous", "clone", "detach", "float"}
_ARITHMETIC_FUNCTIONS = {
    operator.add,
    operator.iadd,
    operator.sub,
    operator.mul,
    operator.imul,
    operator.truediv,
    torch.add,
    torch.sub,
    torch.mul,
}
_ARITHMETIC_METHODS = {"add", "add_", "sub", "mul", "mul_", "div"}
_REDUCTIONS = {"mean", "sum", "amax"}
# Modules without parameters or buffers whose effect on a channel space the walk knows.
STATELESS_MODULES = (
    *ELEMENTWISE_MODULES,
    nn.Flatten,
    nn.MaxPool2d,
    nn.AvgPool2d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool2d,
)
_SHAPE_ATTRIBUTES = {"shape", "dtype", "device", "ndim"}


@dataclass(frozen=True)
class _Chan:
    """A tensor holding the channels of ``space`` at dimension ``dim`` (negative, from the end)."""

    space: int
    dim: int | None  # None: unknown layout (then ndim is None too)
    ndim: int | None
    spatial_one: bool = False  # every dimension after the channels has size 1 (global pooling)

    def positive(self) -> int | None:
        return None if self.ndim is None or self.dim is None else self.ndim + self.dim


@dataclass(frozen=True)
class _Param:
    """A model parameter/buffer, possibly expanded with ``lead`` new leading dimensions."""

    name: str
    shape: tuple[int, ...]
    lead: int = 0


@dataclass
class _Space:
    members: list[Member] = field(default_factory=list)
    reasons: list[str] = field(default_factory=list)


class _Spaces:
    """Union-find over activation spaces."""

    def __init__(self) -> None:
        self.parent: list[int] = []
        self.data: list[_Space] = []

    def new(self, *members: Member, reason: str | None = None) -> int:
        self.parent.append(len(self.parent))
        self.data.append(_Space(list(members), [reason] if reason else []))
        return len(self.parent) - 1

    def find(self, i: int) -> int:
        while self.parent[i] != i:
            self.parent[i] = self.parent[self.parent[i]]
            i = self.parent[i]
        return i

    def union(self, i: int, j: int) -> int:
        i, j = self.find(i), self.find(j)
        if i != j:
            self.parent[j] = i
            self.data[i].members += self.data[j].members
            self.data[i].reasons += self.data[j].reasons
        return i

    def add(self, i: int, member: Member) -> None:
        self.data[self.find(i)].members.append(member)

    def freeze(self, i: int, reason: str) -> None:
        self.data[self.find(i)].reasons.append(reason)

    def roots(self) -> list[int]:
        return sorted({self.find(i) for i in range(len(self.parent))})


class _LeafAttentionTracer(fx.Tracer):
    """Keeps registered attentions, ``conv`` and ``norm_act`` modules (timm's ``Conv2dSame``,
    ``BatchNormAct2d``) whole, so their weights are read as layers, not as traced functions."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return (
            attention_parts(m) is not None
            or is_plain_conv(m)
            or is_norm_act(m)
            or super().is_leaf_module(m, qualname)
        )


def _elementwise_children(m: nn.Module) -> bool:
    """Whether every submodule of a norm applies elementwise (a ``norm_act``'s dropout and
    activation); a plain norm has none."""
    return all(isinstance(c, ELEMENTWISE_MODULES) for c in m.children())


def _flat_values(obj: object) -> list[object]:
    if isinstance(obj, (list, tuple)):
        return [v for item in obj for v in _flat_values(item)]
    if isinstance(obj, dict):
        return [v for item in obj.values() for v in _flat_values(item)]
    return [obj]


class _Interpreter:
    def __init__(self, model: nn.Module, graph: fx.Graph) -> None:
        self.model = model
        self.modules = dict(model.named_modules())
        self.graph = graph
        self.spaces = _Spaces()
        self.env: dict[fx.Node, object] = {}
        self.attention: list[str] = []
        self.params_elsewhere: set[str] = set()
        calls = Counter(n.target for n in graph.nodes if n.op == "call_module")
        self.shared = {name for name, count in calls.items() if count > 1}

    # -- helpers -------------------------------------------------------------------------
    def value(self, arg: object) -> object:
        return self.env.get(arg) if isinstance(arg, fx.Node) else arg

    def freeze_inputs(self, node: fx.Node, reason: str) -> None:
        for v in _flat_values((node.args, node.kwargs)):
            val = self.value(v)
            if isinstance(val, _Chan):
                self.spaces.freeze(val.space, reason)

    def unknown(self, node: fx.Node) -> _Chan | None:
        """An operation the rules do not cover: its tensor inputs freeze, and so does its
        output (a fresh space, so layers reading it are reported with the reason)."""
        what = f"{node.op} {_describe(node.target)} ({node.name})"
        self.freeze_inputs(node, f"reaches {what}")
        tensors = [self.value(v) for v in _flat_values((node.args, node.kwargs))]
        tensors = [t for t in tensors if isinstance(t, (_Chan, _Param))]
        self.params_elsewhere.update(t.name for t in tensors if isinstance(t, _Param))
        return _Chan(self.spaces.new(reason=f"comes from {what}"), None, None) if tensors else None

    def arg(self, node: fx.Node, i: int, key: str, default: object = None) -> object:
        if len(node.args) > i:
            return self.value(node.args[i])
        return self.value(node.kwargs.get(key, default))

    # -- the walk ------------------------------------------------------------------------
    def run(self) -> list[ChannelGroup]:
        for node in self.graph.nodes:
            self.env[node] = self.visit(node)
        self._freeze_conflicts()
        groups = []
        for root in self.spaces.roots():
            space = self.spaces.data[root]
            if not any(m.role == "consumer" for m in space.members):
                continue
            reason = "; ".join(dict.fromkeys(space.reasons)) or None
            groups.append(ChannelGroup(space.members, skip_reason=reason))
        for name in self.attention:
            groups.append(attention_group(name, self.modules[name], source="fx+timm-attention"))
        return groups

    def _freeze_conflicts(self) -> None:
        """A tensor may follow one permutation only: freeze spaces that share one, and spaces
        holding a parameter that is also used outside them."""
        owners: dict[tuple[str, str], set[int]] = {}
        for root in self.spaces.roots():
            for m in self.spaces.data[root].members:
                axis = "in" if m.role == "consumer" else f"dim{m.dim}" if m.role == "parameter" else "out"
                owners.setdefault((m.name, axis), set()).add(root)
                if m.role == "parameter" and m.name in self.params_elsewhere:
                    self.spaces.freeze(root, f"parameter {m.name} is also used outside this space")
        for (name, _), roots in owners.items():
            if len(roots) > 1:
                for root in roots:
                    self.spaces.freeze(root, f"{name} belongs to several channel spaces")

    def visit(self, node: fx.Node) -> object:
        if node.op == "placeholder":
            if node.args and (node.args[0] is None or isinstance(node.args[0], bool)):
                return node.args[0]  # an optional flag or mask left at its default (timm's attn_mask)
            return _Chan(self.spaces.new(reason="model input"), None, None)
        if node.op == "get_attr":
            t = _fetch_attr(self.model, str(node.target))
            return _Param(str(node.target), tuple(t.shape)) if isinstance(t, torch.Tensor) else None
        if node.op == "output":
            self.freeze_inputs(node, "model output")
            return None
        if node.op == "call_module":
            return self.visit_module(node)
        return self.visit_function(node)

    def visit_module(self, node: fx.Node) -> object:
        name = str(node.target)
        m = self.modules[name]
        x = self.arg(node, 0, "input")
        extras = [self.value(v) for v in _flat_values((node.args[1:], node.kwargs))]
        if not node.args or any(isinstance(v, (_Chan, _Param)) for v in extras):
            return self.unknown(node)
        chan = x if isinstance(x, _Chan) else None
        twice = f"{name} is called more than once" if name in self.shared else None
        if (
            isinstance(m, nn.Linear)
            or attention_parts(m) is not None
            or (isinstance(m, nn.Conv2d) and m.groups == 1)
        ):
            conv, attention = isinstance(m, nn.Conv2d), attention_parts(m) is not None
            reader, writer = (f"{name}.qkv", f"{name}.proj") if attention else (name, name)
            if attention and not twice:
                self.attention.append(name)
            self._consume(chan, -3 if conv else -1, reader, node)
            if twice and chan is not None:
                self.spaces.freeze(chan.space, twice)
            out = self.spaces.new(Member(writer, "producer"), reason=twice)
            return _Chan(out, -3, 4) if conv else _Chan(out, -1, chan.ndim if chan else None)
        if isinstance(m, STATELESS_MODULES):
            return self._stateless(node, m, x)
        if twice:
            return self.unknown(node)
        if isinstance(m, nn.Conv2d):
            if m.groups == m.in_channels == m.out_channels and chan is not None and chan.dim == -3:
                self.spaces.add(chan.space, Member(name, "channelwise"))
                return replace(chan, spatial_one=False)
            return self.unknown(node)
        if isinstance(m, nn.BatchNorm2d) or (isinstance(m, nn.LayerNorm) and len(m.normalized_shape) == 1):
            want = -3 if isinstance(m, nn.BatchNorm2d) else -1
            if chan is None or chan.dim != want or not _elementwise_children(m):
                return self.unknown(node)
            self.spaces.add(chan.space, Member(name, "channelwise"))
            return chan
        return self.unknown(node)

    def _stateless(self, node: fx.Node, m: nn.Module, x: object) -> object:
        """Modules without state act the same at every call, so a module called at several
        places (torchvision's ResNet calls one ``relu`` three times) is judged per call."""
        chan = x if isinstance(x, _Chan) else None
        if isinstance(m, ELEMENTWISE_MODULES):
            return x
        if isinstance(m, nn.Flatten):
            if chan is None:
                return self.unknown(node)
            return self._flatten_dims(node, chan, m.start_dim, m.end_dim)
        if chan is None or chan.dim != -3:
            return self.unknown(node)
        global_pool = getattr(m, "output_size", None) in (1, (1, 1))
        return replace(chan, spatial_one=global_pool)

    def _consume(self, chan: _Chan | None, want: int, name: str, node: fx.Node) -> None:
        if chan is None:
            return
        self.spaces.add(chan.space, Member(name, "consumer"))
        if chan.dim is not None and chan.dim != want:  # an unknown layout is frozen already
            self.spaces.freeze(chan.space, f"{name} reads it along another dimension ({node.name})")

    def visit_function(self, node: fx.Node) -> object:
        target = node.target
        method = target if node.op == "call_method" else None
        if (target is getattr and self.arg(node, 1, "") in _SHAPE_ATTRIBUTES) or method in ("size", "dim"):
            return None
        x = self.arg(node, 0, "input")
        if target in _ELEMENTWISE_FUNCTIONS or method in _ELEMENTWISE_METHODS:
            others = _flat_values((node.args[1:], node.kwargs))
            return (
                x
                if not any(isinstance(self.value(v), (_Chan, _Param)) for v in others)
                else self.unknown(node)
            )
        if target in _ARITHMETIC_FUNCTIONS or method in _ARITHMETIC_METHODS:
            return self._arithmetic(node)
        if target is F.layer_norm:
            return self._layer_norm(node, x)
        if target is torch.cat or target is torch.concat:
            return self._cat(node)
        if method == "expand" and isinstance(x, _Param):
            sizes = [self.value(a) for a in node.args[1:]]
            sizes = sizes[0] if len(sizes) == 1 and isinstance(sizes[0], (list, tuple)) else sizes
            return replace(x, lead=len(sizes) - len(x.shape))
        if not isinstance(x, _Chan):
            return self.unknown(node)
        if target is torch.flatten or method == "flatten":
            return self._flatten(node, x)
        if target is torch.transpose or method == "transpose":
            return self._moved(
                node, x, lambda c, nd: _swap(c, self.arg(node, 1, "dim0"), self.arg(node, 2, "dim1"), nd)
            )
        if method == "permute":
            dims = [self.value(d) for d in node.args[1:]]
            dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
            return self._moved(node, x, lambda c, nd: [d % nd for d in dims].index(c))
        if target is operator.getitem:
            return self._getitem(node, x)
        if method in _REDUCTIONS or target in (torch.mean, torch.sum, torch.amax):
            return self._reduce(node, x)
        return self.unknown(node)

    # -- rules ---------------------------------------------------------------------------
    def _join_param(self, chan: _Chan, param: _Param) -> None:
        """Add ``param`` to ``chan``'s space along the dimension it broadcasts onto the channels."""
        at = len(param.shape) + chan.dim
        if at >= 0 and param.shape[at] != 1:
            self.spaces.add(chan.space, Member(param.name, "parameter", dim=at))

    def _arithmetic(self, node: fx.Node) -> object:
        operands = [self.value(a) for a in node.args[:2]]
        if len(operands) < 2 or node.kwargs:
            return self.unknown(node)
        chans = [v for v in operands if isinstance(v, _Chan)]
        params = [v for v in operands if isinstance(v, _Param)]
        scalars = [v for v in operands if isinstance(v, (int, float, bool))]
        if len(chans) == 2:
            a, b = chans
            if a.dim != b.dim:
                return self.unknown(node)
            root = self.spaces.union(a.space, b.space)
            ndim = a.ndim if a.ndim is not None else b.ndim
            return _Chan(root, a.dim, ndim, a.spatial_one and b.spatial_one)
        if len(chans) == 1 and len(params) == 1 and chans[0].dim is not None:
            self._join_param(chans[0], params[0])
            return chans[0]
        if len(chans) == 1 and len(scalars) == 1:
            return chans[0]
        return self.unknown(node)

    def _layer_norm(self, node: fx.Node, x: object) -> object:
        """``F.layer_norm`` over the channels alone (timm's ``LayerNorm`` subclasses trace to it):
        its affine ``weight`` and ``bias`` join the space."""
        shape = self.arg(node, 1, "normalized_shape")
        affine = [self.arg(node, 2, "weight"), self.arg(node, 3, "bias")]
        if not (
            isinstance(x, _Chan)
            and x.dim == -1
            and isinstance(shape, (tuple, list))
            and len(shape) == 1
            and all(p is None or (isinstance(p, _Param) and not p.lead and len(p.shape) == 1) for p in affine)
        ):
            return self.unknown(node)
        for p in affine:
            if p is not None:
                self.spaces.add(x.space, Member(p.name, "parameter"))
        return x

    def _cat(self, node: fx.Node) -> object:
        tensors = [self.value(t) for t in (node.args[0] if node.args else node.kwargs.get("tensors", ()))]
        dim = self.arg(node, 1, "dim", 0)
        chans = [t for t in tensors if isinstance(t, _Chan)]
        if not chans or not all(isinstance(t, (_Chan, _Param)) for t in tensors):
            return self.unknown(node)
        first = chans[0]
        ndim = next((c.ndim for c in chans if c.ndim is not None), None)
        if (
            ndim is None
            or first.dim is None
            or any(c.dim != first.dim for c in chans)
            or dim % ndim == ndim + first.dim
        ):
            return self.unknown(node)
        root = first.space
        for c in chans[1:]:
            root = self.spaces.union(root, c.space)
        joined = _Chan(root, first.dim, ndim)
        for t in tensors:
            if isinstance(t, _Param):
                self._join_param(joined, t)
        return joined

    def _flatten(self, node: fx.Node, x: _Chan) -> object:
        start, end = self.arg(node, 1, "start_dim", 0), self.arg(node, 2, "end_dim", -1)
        return self._flatten_dims(node, x, start, end)

    def _flatten_dims(self, node: fx.Node, x: _Chan, start: int, end: int) -> object:
        if x.ndim is None or not isinstance(start, int) or not isinstance(end, int):
            return self.unknown(node)
        start, end = start % x.ndim, end % x.ndim
        c = x.positive()
        if c < start:
            new_c = c
        elif c > end:
            new_c = c - (end - start)
        elif c == start and x.spatial_one:
            new_c = c  # [B, C, 1, 1] -> [B, C]: the trailing ones carry no channel mixing
        else:
            return self.unknown(node)
        ndim = x.ndim - (end - start)
        return _Chan(x.space, new_c - ndim, ndim)

    def _moved(self, node: fx.Node, x: _Chan, where) -> object:
        if x.ndim is None:
            return self.unknown(node)
        try:
            new_c = where(x.positive(), x.ndim)
        except (TypeError, ValueError):
            return self.unknown(node)
        return _Chan(x.space, new_c - x.ndim, x.ndim)

    def _getitem(self, node: fx.Node, x: _Chan) -> object:
        index = self.value(node.args[1])
        index = index if isinstance(index, tuple) else (index,)
        if x.ndim is None:
            return self.unknown(node)
        c, pos, out, new_c = x.positive(), 0, 0, None
        for item in index:
            if item is None:
                out += 1
                continue
            if isinstance(item, slice) and not any(
                isinstance(v, fx.Node) for v in (item.start, item.stop, item.step)
            ):
                if pos == c:
                    if item != slice(None):
                        return self.unknown(node)
                    new_c = out
                pos, out = pos + 1, out + 1
                continue
            if isinstance(item, int) and not isinstance(item, bool) and pos != c:
                pos += 1
                continue
            return self.unknown(node)
        ndim = out + (x.ndim - pos)
        if new_c is None:
            new_c = out + (c - pos)
        return _Chan(x.space, new_c - ndim, ndim)

    def _reduce(self, node: fx.Node, x: _Chan) -> object:
        dims = self.arg(node, 1, "dim")
        keepdim = bool(self.arg(node, 2, "keepdim", False))
        if x.ndim is None or dims is None:
            return self.unknown(node)
        dims = {d % x.ndim for d in (dims if isinstance(dims, (list, tuple)) else (dims,))}
        c = x.positive()
        if c in dims:
            return self.unknown(node)
        if keepdim:
            return replace(x, spatial_one=all(d in dims for d in range(c + 1, x.ndim)))
        ndim = x.ndim - len(dims)
        return _Chan(x.space, c - sum(d < c for d in dims) - ndim, ndim)


def _swap(c: int, d0: int, d1: int, ndim: int) -> int:
    d0, d1 = d0 % ndim, d1 % ndim
    return d1 if c == d0 else d0 if c == d1 else c


def _describe(target: object) -> str:
    return getattr(target, "__name__", None) or str(target)


def _fetch_attr(model: nn.Module, target: str) -> object:
    obj: object = model
    for part in target.split("."):
        obj = getattr(obj, part)
    return obj


def fx_groups(model: nn.Module) -> GroupList:
    """Channel groups of ``model`` from a symbolic trace (``fx_error`` set if it fails)."""
    try:
        graph = _LeafAttentionTracer().trace(model)
    except Exception as err:
        return GroupList([], trace_error=f"{type(err).__name__}: {err}")
    return GroupList(_Interpreter(model, graph).run())
