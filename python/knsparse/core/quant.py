"""Symmetric quantization arithmetic shared by the quantizer, the fake-quantized modules and the
Q/DQ ONNX export: one definition of a scale, a rounding and a clamp per dtype.

Two dtypes:

- ``"int8"``: ``q = clamp(round_half_even(x / s), -128, 127)``, ``x̂ = q · s``: exactly ONNX
  ``QuantizeLinear``/``DequantizeLinear`` with an int8 zero point of 0 (a true division, as ONNX
  specifies; ``torch.round`` rounds half to even like ONNX). Weights use ``s = amax / 127`` per
  output channel, so they land in ``[-127, 127]`` (symmetric, what TensorRT expects); activations
  use ``s = amax / 127`` per tensor and saturate at ``[-128, 127]`` as ``QuantizeLinear`` does.
- ``"fp8"``: float8 e4m3 (``torch.float8_e4m3fn``, largest finite 448): ``q = e4m3(clamp(x / s,
  ±448))`` (round to nearest even, saturating: ONNX ``QuantizeLinear`` with ``saturate=1``),
  ``s = amax / 448``.

A zero ``amax`` (an all-zero channel or input) gets ``s = 1``: every value quantizes to 0 and the
scale stays finite. Zero maps to zero in both dtypes, so a pruned weight stays exactly zero.
"""

from __future__ import annotations

from typing import Literal

import torch

QuantDType = Literal["int8", "fp8"]
QUANT_DTYPES: tuple[str, ...] = ("int8", "fp8")
"""The quantized dtypes knsparse writes (the one list of them)."""

QMAX: dict[str, float] = {"int8": 127.0, "fp8": 448.0}
"""The amax a scale maps to: ``s = amax / QMAX[dtype]``."""

STORAGE: dict[str, torch.dtype] = {"int8": torch.int8, "fp8": torch.float8_e4m3fn}
"""The torch dtype quantized values are stored in."""

_INT8_RANGE = (-128.0, 127.0)


def scale_from_amax(amax: torch.Tensor, dtype: QuantDType) -> torch.Tensor:
    """``amax / QMAX[dtype]`` in float32 (any shape), with 1 where ``amax`` is 0."""
    amax = amax.detach().float()
    return torch.where(amax > 0, amax / QMAX[dtype], torch.ones_like(amax))


def _compute(t: torch.Tensor) -> torch.dtype:
    """float64 for a float64 tensor (a reference run), float32 otherwise (what ONNX computes)."""
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def quantize(x: torch.Tensor, scale: torch.Tensor, dtype: QuantDType) -> torch.Tensor:
    """The codes of ``x`` at ``scale`` (broadcast against ``x``), stored as ``STORAGE[dtype]``:
    int8 with round-half-even and saturation to ``[-128, 127]``; e4m3 saturating at ±448.
    The division runs in float32 (float64 for a float64 ``x``)."""
    y = x.to(_compute(x)) / scale.to(_compute(x))
    if dtype == "int8":
        return torch.round(y).clamp_(*_INT8_RANGE).to(torch.int8)
    return y.clamp(-QMAX["fp8"], QMAX["fp8"]).to(torch.float8_e4m3fn)


def dequantize(q: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``q · scale`` (``scale`` broadcast against ``q``) in float32, float64 for a float64 scale."""
    return q.to(_compute(scale)) * scale.to(_compute(scale))


def fake_quantize(x: torch.Tensor, scale: torch.Tensor, dtype: QuantDType) -> torch.Tensor:
    """``dequantize(quantize(x))`` in ``x``'s dtype: what a Q/DQ pair computes."""
    return dequantize(quantize(x, scale, dtype), scale.to(_compute(x))).to(x.dtype)


def quantize_per_channel(w: torch.Tensor, dtype: QuantDType) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric per-output-channel quantization of a weight ``[out, ...]``.

    Returns ``(codes, scale)``: codes in ``w``'s shape (``STORAGE[dtype]``), scale ``[out]``
    float32 from each output channel's ``abs().amax()`` of ``w`` as given (the *pruned* weight,
    so the pruned entries never widen the range). Zeros stay zeros; a small weight may round
    to zero, which only adds zeros (a k:n group keeps at most k nonzeros)."""
    amax = w.detach().float().abs().reshape(w.shape[0], -1).amax(1)
    scale = scale_from_amax(amax, dtype)
    view = scale.reshape(-1, *([1] * (w.dim() - 1)))
    return quantize(w.detach(), view, dtype), scale
