"""Fake-quantized twins of ``nn.Linear`` / ``nn.Conv2d`` for evaluating a quantized model.

:class:`QuantLinear` and :class:`QuantConv2d` hold the weight as codes (``weight_q``: int8 or
float8 e4m3 buffer, the layer's weight shape) with one float32 scale per output channel
(``weight_scale [out]``), the per-tensor scale of their input (``input_scale``, a 0-d float32
buffer) and the float bias. ``forward`` quantizes and dequantizes its input
(:func:`knsparse.core.quant.fake_quantize`), dequantizes the weight and runs the float layer:
exactly what ONNX ``QuantizeLinear → DequantizeLinear → Conv/Gemm`` computes. The layer's
attributes (``in_features``, ``kernel_size``, ``stride``, ...) and a read-only ``weight`` (the
dequantized one) are those of the float layer, so code that reads a layer keeps working.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..core.quant import QuantDType, dequantize, fake_quantize, quantize_per_channel


class _QuantLayer(nn.Module):
    """What both fake-quantized layers share (buffers, the dequantized weight, float twin)."""

    dtype_name: QuantDType

    @torch.no_grad()
    def _filled(self, out: nn.Module) -> nn.Module:
        """``out`` (a float layer of this one's shape) with the dequantized weight and the bias."""
        out.weight.copy_(self.weight)
        if self.bias is not None:
            out.bias.copy_(self.bias)
        return out

    def _init_quant(self, layer: nn.Module, input_scale: float, dtype: QuantDType) -> None:
        codes, scale = quantize_per_channel(layer.weight.detach(), dtype)
        self.dtype_name = dtype
        self.register_buffer("weight_q", codes)
        self.register_buffer("weight_scale", scale.to(layer.weight.device))
        self.register_buffer(
            "input_scale", torch.tensor(float(input_scale), dtype=torch.float32, device=layer.weight.device)
        )
        bias = layer.bias
        self.register_buffer("bias", None if bias is None else bias.detach().clone())

    @property
    def weight(self) -> torch.Tensor:
        """The dequantized weight ``weight_q · weight_scale`` (float32, the layer's shape)."""
        view = self.weight_scale.reshape(-1, *([1] * (self.weight_q.dim() - 1)))
        return dequantize(self.weight_q, view)

    def _input(self, x: torch.Tensor) -> torch.Tensor:
        return fake_quantize(x, self.input_scale, self.dtype_name)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, dtype={self.dtype_name}, input_scale={float(self.input_scale):.4g}"


class QuantLinear(_QuantLayer):
    """Fake-quantized ``nn.Linear``: ``y = x̂ Ŵᵀ + b`` with ``x̂``, ``Ŵ`` quantized-dequantized."""

    def __init__(self, layer: nn.Linear, input_scale: float, dtype: QuantDType) -> None:
        super().__init__()
        self.in_features, self.out_features = layer.in_features, layer.out_features
        self._init_quant(layer, input_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        bias = None if self.bias is None else self.bias.to(x.dtype)
        return F.linear(self._input(x), self.weight.to(x.dtype), bias)

    def to_float(self) -> nn.Linear:
        """The float ``nn.Linear`` holding the dequantized weight (no input quantization)."""
        out = nn.Linear(
            self.in_features, self.out_features, self.bias is not None, device=self.weight_q.device
        )
        return self._filled(out)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, " + super().extra_repr()


_CONV_ATTRS = ("in_channels", "out_channels", "kernel_size", "stride", "padding", "dilation", "groups")


class QuantConv2d(_QuantLayer):
    """Fake-quantized ``nn.Conv2d`` (zero padding, any groups)."""

    def __init__(self, layer: nn.Conv2d, input_scale: float, dtype: QuantDType) -> None:
        super().__init__()
        if layer.padding_mode != "zeros":
            raise ValueError(f"QuantConv2d needs padding_mode='zeros', got {layer.padding_mode!r}")
        for attr in _CONV_ATTRS:
            setattr(self, attr, getattr(layer, attr))
        self._init_quant(layer, input_scale, dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.conv2d(
            self._input(x),
            self.weight.to(x.dtype),
            None if self.bias is None else self.bias.to(x.dtype),
            self.stride,
            self.padding,
            self.dilation,
            self.groups,
        )

    def to_float(self) -> nn.Conv2d:
        """The float ``nn.Conv2d`` holding the dequantized weight (no input quantization)."""
        kw = {a: getattr(self, a) for a in _CONV_ATTRS}
        out = nn.Conv2d(**kw, bias=self.bias is not None, device=self.weight_q.device)
        return self._filled(out)

    def extra_repr(self) -> str:
        return ", ".join(f"{a}={getattr(self, a)}" for a in _CONV_ATTRS) + ", " + super().extra_repr()


QUANT_LAYERS = (QuantLinear, QuantConv2d)


def quant_layers(model: nn.Module) -> dict[str, _QuantLayer]:
    """``{name: layer}`` of every fake-quantized layer of ``model``."""
    return {n: m for n, m in model.named_modules() if isinstance(m, QUANT_LAYERS)}


def float_copy(model: nn.Module) -> nn.Module:
    """A deep copy of ``model`` with every fake-quantized layer back to its float twin (the
    dequantized weight; inputs no longer quantized): what the Q/DQ export writes around."""
    import copy

    from .modules import set_submodule

    copied = copy.deepcopy(model)
    for name, layer in quant_layers(copied).items():
        set_submodule(copied, name, layer.to_float())
    return copied
