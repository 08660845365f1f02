"""ONNX Runtime against the fake-quantized PyTorch model, quantizer by quantizer.

Both compute the same float32 operators between the quantizers, but not in the same order
(ORT's kernels accumulate differently, its GELU/LayerNorm/Softmax are other implementations):
an activation whose float32 value lands within an ulp of a rounding boundary (``x / s`` near
``k + 0.5``) may take the neighbouring code in one of them. That changes its layer's input by
one quantization step ``s`` and the output by that step times the rest of the network's gain,
which no float tolerance on the output bounds. So a quantized file is checked in two parts:

1. **replay**: PyTorch is rerun with ONNX Runtime's codes (every activation ``QuantizeLinear``
   output, exposed as an extra graph output) in place of its own at every quantized layer
   input; its outputs must then agree with ONNX Runtime's to the float tolerance (the flips
   explain every difference);
2. **codes**: in that run, at each layer, the codes PyTorch computes from the same earlier codes
   against ONNX Runtime's: at most one step apart (int8 ``|Δq| ≤ 1``; e4m3: adjacent
   representable values) in at most :data:`MAX_FLIP_FRACTION` of the elements (a flip is a local
   float rounding at a boundary; compared on the same earlier codes, flips do not cascade).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import torch
from torch import nn

from ..core.quant import quantize

MAX_FLIP_FRACTION = 1e-3
"""The largest fraction of activation codes ONNX Runtime and PyTorch may round differently."""


@dataclass
class CodeParity:
    """Quantizer-by-quantizer agreement of ONNX Runtime with PyTorch."""

    codes: int  # activation codes compared (every quantized layer input, every checked batch)
    flips: int  # codes that differ
    max_step: float  # largest difference: int8 codes, or e4m3 steps
    replay_diff: float  # max |ORT - PyTorch fed ORT's codes| on the outputs
    layers_with_flips: list[str]

    def to_dict(self) -> dict:
        return asdict(self)


def _e4m3_steps(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """How many representable e4m3 values apart ``a`` and ``b`` are (both e4m3 codes)."""
    ia = a.view(torch.uint8).to(torch.int16)
    ib = b.view(torch.uint8).to(torch.int16)

    def ordinal(i: torch.Tensor) -> torch.Tensor:  # sign-magnitude bytes onto a line
        mag = i & 0x7F
        return torch.where(i & 0x80 != 0, -mag, mag)

    return (ordinal(ia) - ordinal(ib)).abs()


def compare_codes(
    proto,
    reference: nn.Module,
    layers: Mapping[str, nn.Module],
    runs: Sequence[tuple[torch.Tensor, ...]],
    input_names: Sequence[str],
    keywords: Sequence[str] | None,
    session_options=None,
) -> CodeParity:
    """Run ``proto`` with every layer's input ``QuantizeLinear`` output exposed and compare as
    the module docstring says. ``reference`` is the fake-quantized model; ``layers`` its
    ``{name: QuantLinear | QuantConv2d}``; ``runs`` the input tuples checked."""
    import onnxruntime as ort

    named = dict(reference.named_modules())
    layers = {n: named[n] for n in layers}  # the reference's own modules, by the same names
    exposed = copy_with_outputs(proto, [f"{n}.input_quantized" for n in layers])
    session = ort.InferenceSession(
        exposed.SerializeToString(), session_options, providers=["CPUExecutionProvider"]
    )
    n_out = len(proto.graph.output)
    stats = {"codes": 0, "flips": 0, "max_step": 0.0}
    flipped: set[str] = set()
    replay = 0.0
    for xs in runs:
        feed = {n: t.detach().cpu().numpy() for n, t in zip(input_names, xs, strict=True)}
        got = session.run(None, feed)
        outputs, ort_codes = got[:n_out], dict(zip(layers, got[n_out:], strict=True))
        replayed = _replay(reference, layers, xs, keywords, ort_codes, stats, flipped)
        for o, r in zip(outputs, replayed, strict=True):
            diff = (torch.from_numpy(np.asarray(o, dtype=np.float32)) - r.float()).abs().max()
            replay = max(replay, float(diff))
    return CodeParity(stats["codes"], stats["flips"], stats["max_step"], replay, sorted(flipped))


def copy_with_outputs(proto, names: Sequence[str]):
    """A copy of ``proto`` with tensors ``names`` added as graph outputs (untyped shapes)."""
    import onnx
    from onnx import helper

    out = onnx.ModelProto()
    out.CopyFrom(proto)
    elem = {}
    for node in out.graph.node:
        if node.op_type == "QuantizeLinear" and node.output[0] in names:
            zp = next(i for i in out.graph.initializer if i.name == node.input[2])
            elem[node.output[0]] = zp.data_type
    for name in names:
        out.graph.output.append(helper.make_tensor_value_info(name, elem[name], None))
    return out


def _as_codes(arr: np.ndarray, dtype: str, shape: torch.Size) -> torch.Tensor:
    if dtype == "int8":
        return torch.from_numpy(np.asarray(arr).astype(np.int8)).reshape(shape)
    raw = np.asarray(arr)
    if raw.dtype.itemsize == 1:  # ml_dtypes float8 or raw bytes
        return torch.from_numpy(raw.view(np.uint8).copy()).view(torch.float8_e4m3fn).reshape(shape)
    return torch.from_numpy(raw.astype(np.float32)).to(torch.float8_e4m3fn).reshape(shape)


def _call(model: nn.Module, xs: Sequence[torch.Tensor], keywords: Sequence[str] | None):
    from ..utils.batches import output_tensors

    out = model(**dict(zip(keywords, xs, strict=True))) if keywords else model(*xs)
    return output_tensors(out)


def _steps(mine: torch.Tensor, theirs: torch.Tensor, dtype: str) -> torch.Tensor:
    if dtype == "int8":
        return (mine.to(torch.int16) - theirs.to(torch.int16)).abs()
    return _e4m3_steps(mine, theirs)


def _replay(model, layers, xs, keywords, ort_codes, stats, flipped) -> list[torch.Tensor]:
    """PyTorch's outputs with each quantized layer's input replaced by ONNX Runtime's codes
    (dequantized: the layer re-quantizes them to the same codes). Before the replacement, the
    codes PyTorch computes from the same earlier codes are compared with ONNX Runtime's: a
    difference there is that layer's own rounding, not one carried from an earlier flip."""

    def hook_for(name: str):
        def hook(mod: nn.Module, inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
            x = inputs[0]
            theirs = _as_codes(ort_codes[name], mod.dtype_name, x.shape).to(x.device)
            step = _steps(quantize(x.detach(), mod.input_scale, mod.dtype_name), theirs, mod.dtype_name)
            stats["codes"] += step.numel()
            n = int((step > 0).sum())
            if n:
                stats["flips"] += n
                stats["max_step"] = max(stats["max_step"], float(step.max()))
                flipped.add(name)
            return (theirs.float() * mod.input_scale, *inputs[1:])

        return hook

    handles = [m.register_forward_pre_hook(hook_for(n)) for n, m in layers.items()]
    try:
        with torch.no_grad():
            return _call(model, xs, keywords)
    finally:
        for h in handles:
            h.remove()
