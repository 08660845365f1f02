"""The sparse GEMM shapes knsparse's benchmarks and audits send to the native kernels.

``(layer, rows, depth, tokens)`` with rows and depth as ``knsparse.core.pack(pad=True)`` pads them
(multiples of 32 and 64): ViT-B/16 at batch 1-256 (patch embedding, qkv, proj, fc1, fc2, head)
and every ResNet-50 convolution (torchvision v1.5: stride on the 3x3) plus its fc at batch
1-128, lowered to (R,S,C) im2col GEMMs.
"""

from __future__ import annotations

from collections.abc import Iterator


def _round_up(v: int, m: int) -> int:
    return (v + m - 1) // m * m


def _gemm(layer: str, out_f: int, in_f: int, tokens: int) -> tuple[str, int, int, int]:
    return layer, _round_up(out_f, 32), _round_up(in_f, 64), tokens


def vit_b16(batch: int) -> Iterator[tuple[str, int, int, int]]:
    dim, tokens = 768, 197 * batch
    yield _gemm("patch_embed", dim, 3 * 16 * 16, 196 * batch)
    yield _gemm("attn.qkv", 3 * dim, dim, tokens)
    yield _gemm("attn.proj", dim, dim, tokens)
    yield _gemm("mlp.fc1", 4 * dim, dim, tokens)
    yield _gemm("mlp.fc2", dim, 4 * dim, tokens)
    yield _gemm("head", 1000, dim, batch)


def _conv(layer: str, c_in: int, c_out: int, k: int, stride: int, size: int, batch: int, pad: int):
    out = (size + 2 * pad - k) // stride + 1
    return _gemm(layer, c_out, k * k * c_in, batch * out * out), out


def resnet50(batch: int) -> Iterator[tuple[str, int, int, int]]:
    shape, size = _conv("conv1", 3, 64, 7, 2, 224, batch, 3)
    yield shape
    size = (size + 2 - 3) // 2 + 1  # max pool 3x3 stride 2 pad 1: 112 -> 56
    c_in = 64
    for stage, (width, blocks, stride) in enumerate([(64, 3, 1), (128, 4, 2), (256, 6, 2), (512, 3, 2)], 1):
        c_out = 4 * width
        for block in range(blocks):
            s = stride if block == 0 else 1
            name = f"layer{stage}.{block}"
            yield _conv(f"{name}.conv1", c_in, width, 1, 1, size, batch, 0)[0]
            shape, out = _conv(f"{name}.conv2", width, width, 3, s, size, batch, 1)
            yield shape
            yield _conv(f"{name}.conv3", width, c_out, 1, 1, out, batch, 0)[0]
            if block == 0:
                yield _conv(f"{name}.downsample", c_in, c_out, 1, s, size, batch, 0)[0]
            c_in, size = c_out, out
    yield _gemm("fc", 1000, 2048, batch)


def all_shapes() -> list[tuple[str, int, int, int]]:
    """Distinct (layer, rows, depth, tokens) of ViT-B/16 at batch 1-256 and ResNet-50 at 1-128,
    plus odd token counts and rows spanning many tiles."""
    shapes = {s for b in range(1, 257) for s in vit_b16(b)}
    shapes |= {s for b in range(1, 129) for s in resnet50(b)}
    shapes |= {
        ("odd", rows, depth, tokens)
        for rows in (32, 160, 4096)
        for depth in (64, 192)
        for tokens in (1, 3, 5, 7, 9, 199, 1001)
    }
    return sorted(shapes)
