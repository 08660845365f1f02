"""Sparse drop-in modules and the swap that puts them into a model.

``SparseLinear`` and ``SparseConv2d`` keep their weight in the compressed k:n form of
:mod:`knsparse.core.compress` (kept values + in-group slots) and hand it to an execution backend
(:mod:`knsparse.backends`). With ``backend="auto"`` the backend is chosen again whenever the
layer moves to another device or dtype, so a model swapped on CPU and then moved with
``.cuda().half()`` runs on the sparse tensor cores where they accept the layer.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace

import torch
from torch import nn

from .. import backends
from ..backends import Backend, BackendUnavailableError, ConvSpec, LinearSpec
from ..backends.base import ACTIVATIONS
from ..core.checks import check_device, check_flag, check_module, check_names, check_number
from ..core.compress import compress_nm, decompress_nm
from ..core.layers import placement_reasons, swap_ineligibility
from ..core.masks import check_finite, check_groupable
from ..core.pattern import ConvOrder, Pattern
from ..core.plan import SparsityPlan, as_plan
from ..utils.renamed import renamed


def _mask_tensor(name: str | None, weight: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """``mask`` as a bool tensor on the weight's device, after checking its type, shape and
    values, and that the weight is finite (``TypeError`` / ``ValueError`` naming the layer)."""
    label = f"layer {name!r}" if name else "layer"
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"{label}: mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.shape != weight.shape:
        raise ValueError(f"{label}: mask shape {tuple(mask.shape)} != weight shape {tuple(weight.shape)}")
    if mask.dtype != torch.bool:
        if not ((mask == 0) | (mask == 1)).all():
            raise ValueError(
                f"{label}: mask must be bool (or 0/1), got other values in a {mask.dtype} tensor"
            )
        mask = mask.bool()
    check_finite(weight.detach(), label)
    return mask.to(weight.device)


def _checked_mask(name: str | None, module: nn.Module, mask: torch.Tensor, pattern: Pattern) -> torch.Tensor:
    """:func:`_mask_tensor`, then the swap rule (:func:`knsparse.core.layers.swap_ineligibility`) as a
    ``ValueError`` naming the layer: everything a sparse layer needs, checked once."""
    mask = _mask_tensor(name, module.weight, mask)
    reason = swap_ineligibility(name or "", module, mask, pattern)
    if reason:
        raise ValueError(f"layer {name!r}: {reason}" if name and not reason.startswith("layer ") else reason)
    return mask


class _SparseLayer(nn.Module):
    """Shared storage and backend dispatch of the sparse modules."""

    values: torch.Tensor
    slots: torch.Tensor

    def _init_storage(
        self,
        weight_shape: tuple[int, ...],
        pattern: Pattern,
        backend: str,
        bias: bool,
        dtype: torch.dtype | None,
        device: torch.device | str | None,
    ) -> None:
        if not isinstance(pattern, Pattern):
            raise TypeError(f"pattern must be a Pattern, got {type(pattern).__name__}")
        bad = [d for d in weight_shape if isinstance(d, bool) or not isinstance(d, int) or d <= 0]
        if bad:
            raise ValueError(f"layer sizes must be positive ints, got weight shape {tuple(weight_shape)}")
        if not isinstance(backend, str):
            raise TypeError(f"backend must be a str ('auto' or a backend name), got {type(backend).__name__}")
        if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
            raise TypeError(f"dtype must be a floating torch.dtype, got {dtype!r}")
        check_flag(bias, "bias")
        if device is not None:
            device = check_device(device)
        if backend != "auto":
            reason = backends.get(backend).unavailable_reason()
            if reason:
                raise BackendUnavailableError(f"backend {backend!r} is unavailable: {reason}")
        self.pattern = pattern
        self.weight_shape = tuple(weight_shape)
        self.backend_request = backend
        rows = weight_shape[0]
        kept = (torch.Size(weight_shape).numel() // rows) // pattern.n * pattern.k
        self.register_buffer("values", torch.zeros(rows, kept, dtype=dtype, device=device))
        self.register_buffer("slots", torch.zeros(rows, kept, dtype=torch.uint8, device=device))
        self.bias = nn.Parameter(torch.zeros(rows, dtype=dtype, device=device)) if bias else None
        self._forget()

    def _store(self, weight: torch.Tensor, mask: torch.Tensor, bias: torch.Tensor | None) -> None:
        """Keep ``weight`` where the bool ``mask`` is True (:func:`compress_nm` refuses a mask that
        is not k:n, whoever calls)."""
        values, slots = compress_nm(weight.detach(), mask, self.pattern)
        with torch.no_grad():
            self.values.copy_(values)
            self.slots.copy_(slots)
            if bias is not None:
                self.bias.copy_(bias.detach())

    def dense_weight(self) -> torch.Tensor:
        """The masked dense weight (zeros at the pruned entries), in the layer's dtype."""
        return decompress_nm(self.values, self.slots, self.weight_shape, self.pattern)

    def _filled(self, dense: nn.Module) -> nn.Module:
        """``dense`` (a fresh Linear/Conv2d of the same shape) holding this layer's weight and bias."""
        with torch.no_grad():
            dense.weight.copy_(self.dense_weight())
            if self.bias is not None:
                dense.bias.copy_(self.bias)
        return dense

    @property
    def conv_order(self) -> ConvOrder:
        """How the layer's groups run for a conv weight (the pattern's conv order)."""
        return self.pattern.conv_order

    def mask(self) -> torch.Tensor:
        """Bool mask of the kept slots (a stored value may itself be zero)."""
        ones = torch.ones_like(self.values, dtype=torch.float32)
        return decompress_nm(ones, self.slots, self.weight_shape, self.pattern).bool()

    def _spec(self) -> LinearSpec | ConvSpec:
        raise TypeError("subclass must define _spec")

    def _prepare(self, backend: Backend) -> object:
        dense = self.dense_weight()
        if isinstance(self, SparseLinear):
            return backend.prepare_linear(dense)
        return backend.prepare_conv(dense)

    def _forget(self) -> None:
        """Drop the chosen backend and any cached operand; both follow the stored tensors."""
        self._backend: Backend | None = None
        self._backend_for: tuple[torch.device, torch.dtype] | None = None
        self._cached: tuple[tuple, tuple[torch.Tensor, ...], object] | None = None

    def _stored_key(self) -> tuple | None:
        """Identity of the stored values and slots (storage address and in-place write count);
        None for inference tensors, whose in-place writes are not counted, so they are never
        cached."""
        if self.values.is_inference() or self.slots.is_inference():
            return None
        return tuple((t.data_ptr(), t._version) for t in (self.values, self.slots))

    def _operand(self) -> tuple[Backend, object]:
        """The backend for the current device/dtype and its operand for the stored tensors.

        Under ``torch.compile`` every backend's preparation is traced into the graph (plain
        tensor ops), so a compiled model reads the stored tensors at every call and holds no
        operand of its own. In eager mode the reference backend derives the operand in every
        forward; the sparse backends cache it, keyed on the stored tensors' address and version
        counter. The cache keeps those tensors alive, so their memory cannot be reused at the same
        address: a key match means the same tensors with no in-place write since (``copy_``,
        ``load_state_dict``, ``.data =``, moves all change the key). Writes that bypass the
        version counter (in-place on ``.data``, through NumPy) are seen at the next move or
        state-dict load only.
        """
        where = (self.values.device, self.values.dtype)
        if self._backend is None or self._backend_for != where:
            backend, _ = backends.resolve(self.backend_request, self._spec())
            self._forget()
            self._backend = backend if backend is not None else backends.REFERENCE
            self._backend_for = where
        backend = self._backend
        if backend.prepares_in_forward or torch.compiler.is_compiling():
            return backend, self._prepare(backend)
        key = self._stored_key()
        if key is None:
            return backend, self._prepare(backend)
        if self._cached is None or self._cached[0] != key:
            held = (self.values.detach(), self.slots.detach())  # same storage and version counter
            self._cached = (key, held, self._prepare(backend))
        return backend, self._cached[2]

    def _apply(self, fn, recurse: bool = True):
        out = super()._apply(fn, recurse)
        self._forget()
        return out

    def _load_from_state_dict(self, *args, **kwargs) -> None:
        super()._load_from_state_dict(*args, **kwargs)
        self._cached = None  # the key would miss anyway; this frees the old tensors now

    @property
    def active_backend(self) -> str:
        """The backend that runs this layer at its current device and dtype."""
        return self._operand()[0].name

    def extra_repr(self) -> str:
        return f"pattern={self.pattern}, backend={self.backend_request!r}"


class SparseLinear(_SparseLayer):
    """A k:n sparse ``nn.Linear``: ``[..., in_features] -> [..., out_features]``, optionally
    followed by an ``activation`` (``"relu"`` / ``"gelu"``) that the backend fuses into its GEMM
    epilogue where it can (:func:`knsparse.sparse.fuse.fuse_activations` sets it)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        pattern: str | Pattern = "2:4",
        bias: bool = True,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
        *,
        activation: str = "none",
    ) -> None:
        super().__init__()
        check_number(in_features, "in_features", low=1, integer=True)
        check_number(out_features, "out_features", low=1, integer=True)
        pattern = replace(Pattern.parse(pattern), conv_order="rsc")  # a Linear has no conv order
        check_groupable((out_features, in_features), pattern)
        self.in_features = in_features
        self.out_features = out_features
        self.activation = activation
        self._init_storage((out_features, in_features), pattern, backend, bias, dtype, device)

    @property
    def activation(self) -> str:
        """One of ``"none"``, ``"relu"``, ``"gelu"`` (erf GELU, like ``nn.GELU()``)."""
        return self._activation

    @activation.setter
    def activation(self, value: str) -> None:
        if value not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {value!r}")
        self._activation = value

    @classmethod
    def from_dense(
        cls,
        linear: nn.Linear,
        mask: torch.Tensor,
        pattern: str | Pattern = "2:4",
        backend: str = "auto",
        name: str | None = None,
    ) -> SparseLinear:
        """Build from ``linear`` keeping the weights where ``mask`` (``[out, in]``, k:n) is True."""
        if not isinstance(linear, nn.Linear):
            raise TypeError(f"layer {name!r}: linear must be an nn.Linear, got {type(linear).__name__}")
        pattern = Pattern.parse(pattern)
        return cls._build(linear, _checked_mask(name, linear, mask, pattern), pattern, backend)

    @classmethod
    def _build(cls, linear: nn.Linear, mask: torch.Tensor, pattern: Pattern, backend: str) -> SparseLinear:
        w = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            pattern,
            linear.bias is not None,
            backend,
            w.dtype,
            w.device,
        )
        layer._store(w, mask, linear.bias)
        layer.train(linear.training)
        layer._operand()  # fails now, not at the first forward, if the backend rejects the layer
        return layer

    def _spec(self) -> LinearSpec:
        return LinearSpec(
            self.out_features, self.in_features, self.values.dtype, self.pattern, self.values.device
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend, operand = self._operand()
        y = backend.linear(x.reshape(-1, self.in_features), operand, self.bias, self.activation)
        return y.reshape(*x.shape[:-1], self.out_features)

    def to_dense(self) -> nn.Linear:
        """An ``nn.Linear`` holding the masked dense weight — without a fused activation, which
        :func:`knsparse.sparse.densify.dense_copy` puts back where it was taken from."""
        lin = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, self.values.device, self.values.dtype
        )
        return self._filled(lin)

    def extra_repr(self) -> str:
        act = f", activation={self.activation!r}" if self.activation != "none" else ""
        shape = f"in_features={self.in_features}, out_features={self.out_features}, "
        return shape + super().extra_repr() + act


class SparseConv2d(_SparseLayer):
    """A k:n sparse ``nn.Conv2d`` (groups=1, zero padding); groups run along (R,S,C) by default."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: tuple[int, int],
        stride: tuple[int, int] = (1, 1),
        padding: tuple[int, int] | str = (0, 0),
        dilation: tuple[int, int] = (1, 1),
        pattern: str | Pattern = "2:4",
        bias: bool = True,
        conv_order: ConvOrder | None = None,
        backend: str = "auto",
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> None:
        super().__init__()
        check_number(in_channels, "in_channels", low=1, integer=True)
        check_number(out_channels, "out_channels", low=1, integer=True)
        pattern = Pattern.parse(pattern, conv_order)
        shape = (out_channels, in_channels, *kernel_size)
        check_groupable(shape, pattern)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.kernel_size = tuple(kernel_size)
        self.stride = tuple(stride)
        self.padding = padding if isinstance(padding, str) else tuple(padding)
        self.dilation = tuple(dilation)
        self._init_storage(shape, pattern, backend, bias, dtype, device)

    @classmethod
    def from_dense(
        cls,
        conv: nn.Conv2d,
        mask: torch.Tensor,
        pattern: str | Pattern = "2:4",
        backend: str = "auto",
        conv_order: ConvOrder | None = None,
        name: str | None = None,
    ) -> SparseConv2d:
        """Build from ``conv`` keeping the weights where ``mask`` (``[Cout, Cin, R, S]``, k:n) is True."""
        if not isinstance(conv, nn.Conv2d):
            raise TypeError(f"layer {name!r}: conv must be an nn.Conv2d, got {type(conv).__name__}")
        pattern = Pattern.parse(pattern, conv_order)
        return cls._build(conv, _checked_mask(name, conv, mask, pattern), pattern, backend)

    @classmethod
    def _build(cls, conv: nn.Conv2d, mask: torch.Tensor, pattern: Pattern, backend: str) -> SparseConv2d:
        w = conv.weight
        layer = cls(
            conv.in_channels,
            conv.out_channels,
            conv.kernel_size,
            conv.stride,
            conv.padding,
            conv.dilation,
            pattern,
            conv.bias is not None,
            None,
            backend,
            w.dtype,
            w.device,
        )
        layer._store(w, mask, conv.bias)
        layer.train(conv.training)
        layer._operand()
        return layer

    def _spec(self) -> ConvSpec:
        return ConvSpec(
            self.out_channels,
            self.in_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            1,
            self.values.dtype,
            self.pattern,
            self.values.device,
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend, operand = self._operand()
        return backend.conv2d(x, operand, self.bias, self._spec())

    def to_dense(self) -> nn.Conv2d:
        """An equivalent ``nn.Conv2d`` holding the masked dense weight."""
        conv = nn.Conv2d(
            self.in_channels,
            self.out_channels,
            self.kernel_size,
            self.stride,
            self.padding,
            self.dilation,
            bias=self.bias is not None,
            device=self.values.device,
            dtype=self.values.dtype,
        )
        return self._filled(conv)

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"padding={self.padding}, conv_order={self.conv_order!r}, " + super().extra_repr()
        )


@dataclass
class SwapReport:
    """What :func:`swap_modules` did: swapped layers with their backend, skipped ones with the reason."""

    swapped: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"swapped {len(self.swapped)} layer(s), skipped {len(self.skipped)}"]
        lines += [f"  swapped  {n:<32} backend={b}" for n, b in self.swapped.items()]
        lines += [f"  skipped  {n:<32} {r}" for n, r in self.skipped.items()]
        return "\n".join(lines)


def _matches(name: str, patterns: tuple[str, ...] | None) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns or ())


def set_submodule(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, new)


@renamed(masks="plan")
def swap_modules(
    model: nn.Module,
    plan: SparsityPlan | Mapping[str, torch.Tensor],
    pattern: str | Pattern | None = None,
    backend: str = "auto",
    include: Iterable[str] | None = None,
    exclude: Iterable[str] | None = None,
    conv_order: ConvOrder | None = None,
) -> SwapReport:
    """Replace every named Linear/Conv2d that has a mask by its sparse twin, in place.

    Args:
        model: the model to modify.
        plan: a :class:`~knsparse.core.plan.SparsityPlan` (``prune(...).plan``, read whole: its
            pattern and conv order), or ``{module name: bool mask of its weight}``.
        pattern: the k:n pattern a mask dict follows (default ``"2:4"``; a plan has its own).
        backend: ``"auto"`` or a backend name (see :func:`knsparse.backends.available`).
        include, exclude: glob patterns over module names (``"blocks.*.mlp.*"``) to restrict
            which masked layers are swapped; a single str is one pattern.
        conv_order: grouping of conv weights of a mask dict, ``"rsc"`` (TensorRT, default) or ``"crs"``.

    Returns:
        A :class:`SwapReport`. Layers that cannot carry the pattern (shape, grouped conv, a
        mask that is not k:n, no sparse backend for the shape on CUDA) are skipped with the
        reason and left as they are.

    Raises:
        ValueError / TypeError: unknown layer name, a layer that is not Linear/Conv2d, a mask
            of the wrong shape or type, a NaN/Inf weight, or an explicitly requested backend
            that cannot run a layer. Nothing in the model is changed when this happens.
    """
    check_module(model, meta="refuse")
    plan = as_plan(plan, pattern, conv_order)
    masks, pattern = plan.masks, plan.pattern
    if not isinstance(backend, str):
        raise TypeError(f"backend must be a str ('auto' or a backend name), got {type(backend).__name__}")
    if backend != "auto":
        backends.get(backend)  # an unknown name raises, naming the known ones
    include = None if include is None else check_names(include, "include")
    exclude = None if exclude is None else check_names(exclude, "exclude")
    modules = dict(model.named_modules(remove_duplicate=False))
    unknown = [n for n in masks if n not in modules]
    if unknown:
        raise ValueError(f"masks name layers the model does not have: {unknown[:5]}")
    placement = placement_reasons(model)
    report = SwapReport()
    replacements: dict[str, nn.Module] = {}
    for name, module in modules.items():
        if name not in masks:
            continue
        if not isinstance(module, (nn.Linear, nn.Conv2d)):
            raise TypeError(f"layer {name!r} is a {type(module).__name__}, not nn.Linear or nn.Conv2d")
        mask = _mask_tensor(name, module.weight, masks[name])
        if include is not None and not _matches(name, include):
            report.skipped[name] = "not matched by include"
            continue
        if _matches(name, exclude):
            report.skipped[name] = "matched by exclude"
            continue
        reason = placement.get(name) or swap_ineligibility(name, module, mask, pattern)
        if reason is None and backend == "auto" and module.weight.device.type == "cuda":
            chosen, why = backends.resolve("auto", _spec_of(module, pattern))
            reason = None if chosen is not None else f"no sparse backend runs it: {why}"
        if reason:
            report.skipped[name] = reason
            continue
        if isinstance(module, nn.Linear):
            new: _SparseLayer = SparseLinear._build(module, mask, pattern, backend)
        else:
            new = SparseConv2d._build(module, mask, pattern, backend)
        replacements[name] = new
        report.swapped[name] = new.active_backend
    for name, new in replacements.items():
        set_submodule(model, name, new)
    return report


def _spec_of(module: nn.Module, pattern: Pattern) -> LinearSpec | ConvSpec:
    w = module.weight
    if isinstance(module, nn.Linear):
        return LinearSpec(module.out_features, module.in_features, w.dtype, pattern, w.device)
    return ConvSpec(
        module.out_channels,
        module.in_channels,
        module.kernel_size,
        module.stride,
        module.padding,
        module.dilation,
        module.groups,
        w.dtype,
        pattern,
        w.device,
    )


def sparse_layers(model: nn.Module) -> dict[str, _SparseLayer]:
    """The SparseLinear / SparseConv2d modules of ``model`` by name."""
    return {n: m for n, m in model.named_modules() if isinstance(m, _SparseLayer)}
