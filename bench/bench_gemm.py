"""Dense vs 2:4 sparse GEMMs for ViT-B/16 linears and ResNet-50 convolutions on one GPU.

Linear (M = batch * 197 tokens, ViT-B/16 qkv / proj / fc1 / fc2, bias, and fc1 + GELU):
    dense-cublas      F.linear on the dense masked weight
    torch-cusparselt  F.linear on to_sparse_semi_structured(weight) (cuSPARSELt)
    torch-cutlass     the same with torch's CUTLASS kernels (compute capability 8.x only)
    knsparse-cuda     knsparse's CUTLASS kernel, bias / GELU fused in the epilogue (on Hopper
                      also -large / -small: each tile configuration forced, and -sm80ptx: the
                      Ampere kernel through its compute_80 PTX)
Conv (ResNet-50 bottleneck convolutions, bias + ReLU, channels-last fp16 input):
    dense-cudnn            F.conv2d
    dense-im2col-gemm      knsparse im2col (R,S,C) + F.linear (cuBLAS)
    sparse-im2col-gemm     knsparse im2col (R,S,C) + knsparse sparse GEMM
    sparse-1x1-direct      1x1 stride-1 convs: the channels-last input is the GEMM operand
    im2col-only            the im2col kernel alone (to split the sparse-im2col-gemm time)

Times are triton.testing.do_bench medians with 20% / 80% quantiles; every backend is checked
against the dense result before it is timed. TFLOP/s = 2*M*N*K / median (dense-equivalent
FLOPs for every backend, so TFLOP/s ratios equal speedups). Every backend of every case runs in
its own try/except (a failure is a row with its error), and the JSON
bench/results/bench_gemm_<device>.json (bench/_meta.py's provenance block; "complete": false
until the last case) is rewritten after every case, so a time-out keeps what was measured. A
PNG of the speedups over dense follows at the end. Without a GPU every case is recorded as
unavailable with the reason (the same plumbing, nothing timed).

    python bench/bench_gemm.py                 # on a GPU machine, fp16 and bf16
    python bench/bench_gemm.py --dry-run       # list the cases (no GPU needed)
"""

from __future__ import annotations

import argparse
import importlib.metadata
import re
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from _meta import write_result
from tqdm import tqdm

from knsparse import backends
from knsparse.backends import LinearSpec
from knsparse.core.masks import nm_mask, to_reduction_view
from knsparse.core.pack import pack_24
from knsparse.core.pattern import Pattern
from knsparse.ops import gemm
from knsparse.ops.device import unavailable_reason
from knsparse.ops.im2col import conv_output_size, im2col_rsc
from knsparse.ops.meta import prepare_meta

VIT_TOKENS = 197
VIT_DIM = 768
# (name, out features, in features, activation)
VIT_LINEARS = [
    ("attn.qkv", 3 * VIT_DIM, VIT_DIM, "none"),
    ("attn.proj", VIT_DIM, VIT_DIM, "none"),
    ("mlp.fc1", 4 * VIT_DIM, VIT_DIM, "none"),
    ("mlp.fc1+gelu", 4 * VIT_DIM, VIT_DIM, "gelu"),
    ("mlp.fc2", VIT_DIM, 4 * VIT_DIM, "none"),
]
# ResNet-50 (torchvision v1.5) bottleneck convolutions: (name, c_in, c_out, kernel, stride, input size)
RESNET50_CONVS = [
    ("layer1.conv1", 256, 64, 1, 1, 56),
    ("layer1.conv2", 64, 64, 3, 1, 56),
    ("layer1.conv3", 64, 256, 1, 1, 56),
    ("layer2.0.conv2", 128, 128, 3, 2, 56),
    ("layer2.conv2", 128, 128, 3, 1, 28),
    ("layer2.conv3", 128, 512, 1, 1, 28),
    ("layer3.0.conv2", 256, 256, 3, 2, 28),
    ("layer3.conv1", 1024, 256, 1, 1, 14),
    ("layer3.conv2", 256, 256, 3, 1, 14),
    ("layer3.conv3", 256, 1024, 1, 1, 14),
    ("layer4.0.conv2", 512, 512, 3, 2, 14),
    ("layer4.conv2", 512, 512, 3, 1, 7),
    ("layer4.conv3", 512, 2048, 1, 1, 7),
]
LINEAR_BATCHES = [1, 2, 4, 8, 16, 32, 64, 128, 256]
CONV_BATCHES = [1, 8, 32, 64]
ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"none": lambda t: t, "gelu": F.gelu}


@dataclass
class Row:
    kind: str  # "linear" | "conv"
    dtype: str
    layer: str
    batch: int
    m: int
    n: int
    k: int
    backend: str
    status: str  # "ok" or why the backend did not run
    ms_q20: float | None = None
    ms_median: float | None = None
    ms_q80: float | None = None
    tflops: float | None = None
    speedup_vs_dense: float | None = None
    max_abs_err_vs_dense: float | None = None


def library_versions() -> dict[str, str | None]:
    """What bench/_meta.environment() does not record but these kernels depend on."""

    def dist(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    return {"cudnn": None if cudnn is None else str(cudnn), "nvidia-cutlass": dist("nvidia-cutlass")}


def time_ms(fn: Callable[[], object], warmup: int, rep: int) -> tuple[float, float, float]:
    from triton.testing import do_bench

    q20, median, q80 = do_bench(fn, warmup=warmup, rep=rep, quantiles=[0.2, 0.5, 0.8])
    return q20, median, q80


def masked(rows: int, depth: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(rows, depth, generator=g) / depth**0.5
    return (w * nm_mask(w.abs(), "2:4")).to(dtype).cuda()


def knsparse_variants(w: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor, str]]:
    """knsparse-cuda row name -> (values, meta, config): the default (this GPU's metadata, tile
    configuration by SM count) and, on Hopper, each configuration forced and the Ampere kernel."""
    packed = pack_24(w)
    variants = {"knsparse-cuda": (packed.values, prepare_meta(packed.meta), "auto")}
    if torch.cuda.get_device_capability(w.device) == (9, 0):
        hopper = prepare_meta(packed.meta, "sm90")
        variants["knsparse-cuda-large"] = (packed.values, hopper, "large")
        variants["knsparse-cuda-small"] = (packed.values, hopper, "small")
        variants["knsparse-cuda-sm80ptx"] = (packed.values, packed.meta, "auto")
    return variants


def linear_backends(w: torch.Tensor, bias: torch.Tensor, activation: str) -> dict[str, Callable | str]:
    """backend -> fn(x) computing act(x @ w.T + bias), or the reason it is unavailable."""
    act = ACTIVATIONS[activation]
    out: dict[str, Callable | str] = {"dense-cublas": lambda x: act(F.linear(x, w, bias))}
    spec = LinearSpec(w.shape[0], w.shape[1], w.dtype, Pattern(2, 4), w.device)
    for name in ("torch-cusparselt", "torch-cutlass"):
        backend = backends.get(name)
        reason = backend.unavailable_reason() or backend.linear_unsupported_reason(spec)
        if reason is None:
            operand = backend.prepare_linear(w)
            out[name] = lambda x, b=backend, op=operand: act(b.linear(x, op, bias))
        else:
            out[name] = f"unavailable: {reason}"
    reason = unavailable_reason(w.device)
    if reason is not None:
        out["knsparse-cuda"] = f"unavailable: {reason}"
        return out
    for name, (values, meta, config) in knsparse_variants(w).items():
        out[name] = lambda x, v=values, m=meta, c=config: gemm.sparse_gemm(v, m, x, bias, activation, c)
    return out


def conv_backends(
    weight: torch.Tensor, bias: torch.Tensor, kernel: int, stride: int
) -> dict[str, Callable | str]:
    """backend -> fn(x) computing relu(conv2d(x) + bias) as [N*P*Q, Cout] or NCHW, or a reason."""
    pad = kernel // 2
    w_rsc = to_reduction_view(weight, "rsc").contiguous()
    out: dict[str, Callable | str] = {
        "dense-cudnn": lambda x: F.relu(F.conv2d(x, weight, bias, stride, pad)),
        "dense-im2col-gemm": lambda x: F.relu(F.linear(im2col_rsc(x, kernel, stride, pad), w_rsc, bias)),
    }
    reason = unavailable_reason(weight.device)
    if reason is not None:
        for name in ("sparse-im2col-gemm", "sparse-1x1-direct", "im2col-only"):
            out[name] = f"unavailable: {reason}"
        return out
    values, meta, _ = knsparse_variants(w_rsc)["knsparse-cuda"]
    out["sparse-im2col-gemm"] = lambda x: gemm.sparse_gemm(
        values, meta, im2col_rsc(x, kernel, stride, pad), bias, "relu"
    )
    out["im2col-only"] = lambda x: im2col_rsc(x, kernel, stride, pad)
    if kernel == 1 and stride == 1:
        c = weight.shape[1]
        out["sparse-1x1-direct"] = lambda x: gemm.sparse_gemm(
            values, meta, x.permute(0, 2, 3, 1).reshape(-1, c), bias, "relu"
        )
    else:
        out["sparse-1x1-direct"] = "not applicable: only 1x1 stride-1 convolutions run without im2col"
    return out


def as_rows(y: torch.Tensor) -> torch.Tensor:
    """Any backend's conv output as [N*P*Q, Cout] for comparison."""
    return y.permute(0, 2, 3, 1).reshape(-1, y.shape[1]) if y.dim() == 4 else y


def error_text(exc: Exception) -> str:
    return f"error: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"[:300]


def run_case(
    kind: str,
    dtype: str,
    layer: str,
    batch: int,
    mnk: tuple[int, int, int],
    fns: dict[str, Callable | str],
    x,
    args,
) -> list[Row]:
    """Check every backend against dense, then time it; each backend in its own try/except."""
    m, n, k = mnk
    flops = 2.0 * m * n * k
    rows: list[Row] = []
    dense_name = "dense-cublas" if kind == "linear" else "dense-cudnn"
    dense_out = as_rows(fns[dense_name](x)).float()
    dense_ms = None
    for name, fn in fns.items():
        row = Row(kind, dtype, layer, batch, m, n, k, name, status="ok")
        rows.append(row)
        if isinstance(fn, str):
            row.status = fn
            continue
        try:
            if name != "im2col-only":
                err = (as_rows(fn(x)).float() - dense_out).abs().max().item()
                row.max_abs_err_vs_dense = err
                scale = dense_out.abs().max().item()
                if not err <= 0.05 * scale + 1e-3:
                    row.status = f"wrong result: max |err| {err:.3e} vs max |dense| {scale:.3e}"
                    continue
            row.ms_q20, row.ms_median, row.ms_q80 = time_ms(lambda fn=fn: fn(x), args.warmup, args.rep)
        except Exception as exc:  # one failing backend must not cost the others' figures
            row.status = error_text(exc)
            continue
        if name != "im2col-only":
            row.tflops = flops / (row.ms_median * 1e-3) / 1e12
        if name == dense_name:
            dense_ms = row.ms_median
    for row in rows:
        if row.ms_median is not None and dense_ms is not None and row.backend != "im2col-only":
            row.speedup_vs_dense = dense_ms / row.ms_median
    return rows


def linear_cases(batches: list[int]):
    for layer, out_f, in_f, activation in VIT_LINEARS:
        for batch in batches:
            yield layer, batch, (batch * VIT_TOKENS, out_f, in_f), activation


def conv_cases(batches: list[int]):
    for layer, c_in, c_out, kernel, stride, size in RESNET50_CONVS:
        p = conv_output_size(size, kernel, stride, kernel // 2, 1)
        for batch in batches:
            yield (
                layer,
                batch,
                (batch * p * p, c_out, c_in * kernel * kernel),
                (c_in, c_out, kernel, stride, size),
            )


def plot(rows: list[Row], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(14, 5))
    linear = [
        r for r in rows if r.kind == "linear" and r.speedup_vs_dense is not None and r.layer == "mlp.fc1"
    ]
    for backend in sorted({r.backend for r in linear} - {"dense-cublas"}):
        pts = sorted((r.batch, r.speedup_vs_dense) for r in linear if r.backend == backend)
        axes[0].plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=backend)
    axes[0].set_xscale("log", base=2)
    axes[0].axhline(1.0, color="grey", lw=0.8)
    axes[0].set(title="ViT-B/16 mlp.fc1: speedup over dense cuBLAS", xlabel="batch (x197 tokens)", ylabel="x")
    axes[0].legend()
    conv = [r for r in rows if r.kind == "conv" and r.speedup_vs_dense is not None]
    largest = max((r.batch for r in conv), default=0)
    conv = [r for r in conv if r.batch == largest]
    backends = sorted({r.backend for r in conv} - {"dense-cudnn"})
    layers = list(dict.fromkeys(r.layer for r in conv))
    width = 0.8 / max(len(backends), 1)
    for i, backend in enumerate(backends):
        vals = [
            next((r.speedup_vs_dense for r in conv if r.layer == lay and r.backend == backend), 0.0)
            for lay in layers
        ]
        axes[1].bar([j + i * width for j in range(len(layers))], vals, width, label=backend)
    axes[1].set_xticks([j + 0.4 - width / 2 for j in range(len(layers))], layers, rotation=60, ha="right")
    axes[1].axhline(1.0, color="grey", lw=0.8)
    axes[1].set(title="ResNet-50 convs (largest batch): speedup over cuDNN", ylabel="x")
    axes[1].legend()
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def measure(kind: str, case: tuple, dtype_name: str, args) -> list[Row]:
    """One case's rows: measured on a GPU, each backend marked unavailable without one."""
    layer, batch, mnk, extra = case
    m, n, k = mnk
    if not torch.cuda.is_available():
        reason = "unavailable: no CUDA device (torch.cuda.is_available() is False)"
        return [Row(kind, dtype_name, layer, batch, m, n, k, "all", status=reason)]
    dtype = getattr(torch, dtype_name)
    try:
        if kind == "linear":
            w = masked(n, k, dtype, seed=n + k)
            bias = torch.randn(n, device="cuda", dtype=dtype)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            return run_case(kind, dtype_name, layer, batch, mnk, linear_backends(w, bias, extra), x, args)
        c_in, c_out, kernel, stride, size = extra
        w = masked(c_out, c_in * kernel * kernel, dtype, seed=c_in + c_out + kernel)
        weight = w.reshape(c_out, kernel, kernel, c_in).permute(0, 3, 1, 2).contiguous()  # RSC-masked
        bias = torch.randn(c_out, device="cuda", dtype=dtype)
        x = torch.randn(batch, c_in, size, size, device="cuda", dtype=dtype)
        x = x.to(memory_format=torch.channels_last)
        fns = conv_backends(weight, bias, kernel, stride)
        return run_case(kind, dtype_name, layer, batch, mnk, fns, x, args)
    except Exception as exc:  # the dense reference or the setup failed: record it, go on
        return [Row(kind, dtype_name, layer, batch, m, n, k, "all", status=error_text(exc))]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", type=lambda s: s.split(","), default=["float16", "bfloat16"])
    parser.add_argument(
        "--linear-batches", type=lambda s: [int(v) for v in s.split(",")], default=LINEAR_BATCHES
    )
    parser.add_argument("--conv-batches", type=lambda s: [int(v) for v in s.split(",")], default=CONV_BATCHES)
    parser.add_argument("--skip-linear", action="store_true")
    parser.add_argument("--skip-conv", action="store_true")
    parser.add_argument("--warmup", type=int, default=25, help="do_bench warmup (ms)")
    parser.add_argument("--rep", type=int, default=100, help="do_bench measurement time (ms)")
    parser.add_argument("--dry-run", action="store_true", help="list the cases and exit (no GPU needed)")
    args = parser.parse_args(argv)
    if unknown := set(args.dtypes) - {"float16", "bfloat16"}:
        parser.error(f"--dtypes takes float16 and/or bfloat16, got {sorted(unknown)}")

    linear = [] if args.skip_linear else list(linear_cases(args.linear_batches))
    conv = [] if args.skip_conv else list(conv_cases(args.conv_batches))
    if args.dry_run:
        for kind, cases in (("linear", linear), ("conv", conv)):
            for layer, batch, (m, n, k), _ in cases:
                gflop = 2 * m * n * k / 1e9
                print(
                    f"{kind:6s} {layer:14s} batch {batch:4d}  M={m:6d} N={n:5d} K={k:5d}  GFLOP={gflop:9.2f}"
                )
        return 0

    cuda = torch.cuda.is_available()
    device_name = torch.cuda.get_device_name() if cuda else "no CUDA device"
    torch.backends.cudnn.benchmark = True
    slug = re.sub(r"[^a-z0-9]+", "_", device_name.lower()).strip("_")
    rows: list[Row] = []

    def save(complete: bool) -> Path:
        return write_result(
            f"bench_gemm_{slug}",
            {
                "benchmark": "bench_gemm",
                "complete": complete,
                "compute_capability": ".".join(map(str, torch.cuda.get_device_capability()))
                if cuda
                else None,
                "dtypes": args.dtypes,
                "library_versions": library_versions(),
                "timing": {"method": "triton.testing.do_bench", "warmup_ms": args.warmup, "rep_ms": args.rep},
                "flops_formula": "2*M*N*K dense-equivalent FLOPs for every backend (M tokens or N*P*Q, N "
                "out features, K = in features or C*R*S); tflops = flops / median time",
                "results": [asdict(r) for r in rows],
            },
        )

    cases = [
        (kind, case, d)
        for d in args.dtypes
        for kind, cs in (("linear", linear), ("conv", conv))
        for case in cs
    ]
    path = save(complete=False)
    for kind, case, dtype_name in tqdm(cases, desc="bench_gemm"):
        rows += measure(kind, case, dtype_name, args)
        path = save(complete=False)
    path = save(complete=True)
    if cuda:
        plot(rows, path.with_suffix(".png"), f"{device_name}, {', '.join(args.dtypes)}")
    failed = [r for r in rows if r.status.startswith(("error", "wrong"))]
    print(f"bench_gemm: wrote {path} ({len(rows)} rows, {len(failed)} failed)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
