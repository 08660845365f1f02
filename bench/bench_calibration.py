"""Calibration throughput: knsparse's one-pass streaming statistics vs a hook-based reference.

``knsparse.pruning.calibration.collect_input_stats(group=4)`` (what CAST uses: column sums of squares and
4x4 block Gram matrices of every prunable layer's GEMM inputs) runs one forward pass per batch
for all layers together, folding each batch into fixed-size accumulators. The reference is the
straightforward way: forward hooks keep every layer's input of every batch, and the statistics
are computed per layer afterwards from the stored activations. Both run in the same process on
the same batches (random images; ViT-B/16 and ResNet-50 from ``knsparse.models``, timm's module
names and shapes, random init), and their statistics are checked to agree.

    python bench/bench_calibration.py --images 8 --batch 4   # writes bench/results/calibration.json
"""

from __future__ import annotations

import argparse
import os
import time

import torch
from _meta import write_result
from torch import nn

from knsparse.models import resnet50, vit_base_patch16_224
from knsparse.pruning.calibration import InputStats, collect_input_stats, gemm_input_rows


def prunable(model: nn.Module) -> dict[str, nn.Module]:
    """Linear / Conv2d layers whose reduction size 4 divides (the others are not 2:4-prunable)."""
    return {
        n: m
        for n, m in model.named_modules()
        if isinstance(m, (nn.Linear, nn.Conv2d)) and m.weight[0].numel() % 4 == 0
    }


def reference_stats(model: nn.Module, layers: dict[str, nn.Module], batches: list[torch.Tensor], group: int):
    """Store every layer's inputs with forward pre-hooks, then compute the statistics per layer."""
    stored: dict[str, list[torch.Tensor]] = {n: [] for n in layers}
    handles = [
        m.register_forward_pre_hook(lambda _m, inputs, n=n: stored[n].append(inputs[0].detach().clone()))
        for n, m in layers.items()
    ]
    try:
        model.eval()
        with torch.no_grad():
            for x in batches:
                model(x)
    finally:
        for h in handles:
            h.remove()
    out = {}
    for name, module in layers.items():
        rows = gemm_input_rows(module, torch.cat(stored.pop(name))).float()
        flat = rows.reshape(-1, rows.shape[-1])
        g = flat.reshape(flat.shape[0], -1, group)
        out[name] = InputStats(
            rows.shape[0], flat.square().sum(0).double(), torch.einsum("tgi,tgj->gij", g, g).double()
        )
    return out


def max_rel_diff(a: dict[str, InputStats], b: dict[str, InputStats]) -> float:
    worst = 0.0
    for name in a:
        for x, y in ((a[name].sum_sq, b[name].sum_sq), (a[name].block_gram, b[name].block_gram)):
            worst = max(worst, float((x - y).abs().max() / y.abs().max().clamp_min(1e-30)))
    return worst


def bench_model(name: str, images: int, batch: int, group: int) -> dict:
    torch.manual_seed(0)
    model = {"vit_base_patch16_224": vit_base_patch16_224, "resnet50": resnet50}[name]()
    layers = prunable(model)
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(batch, 3, 224, 224, generator=gen) for _ in range(images // batch)]
    result = {"layers": len(layers), "images": images, "batch": batch}
    with torch.no_grad():  # warm-up: neither method pays the first forward's one-off costs
        model.eval()(batches[0])
    timed = {}
    for method, fn in (
        ("knsparse", lambda: collect_input_stats(model, layers, batches, group=group)),
        ("hook_reference", lambda: reference_stats(model, layers, batches, group)),
    ):
        wall, cpu = time.perf_counter(), time.process_time()
        timed[method] = fn()
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        result[method] = {"seconds": wall, "cpu_seconds": cpu, "images_per_s": images / wall}
    result["speedup_vs_reference"] = result["hook_reference"]["seconds"] / result["knsparse"]["seconds"]
    result["max_rel_diff_vs_reference"] = max_rel_diff(timed["knsparse"], timed["hook_reference"])
    return result


def run(models: list[str], images: int, batch: int, threads: int = 2) -> dict:
    """The comparison for each model, as a JSON-ready dict."""
    torch.set_num_threads(threads)
    return {
        "benchmark": "calibration statistics (column sums of squares + 4x4 block Gram), CPU",
        "threads": threads,
        "models": {m: bench_model(m, images, batch, 4) for m in models},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--models", nargs="+", default=["vit_base_patch16_224", "resnet50"])
    args = parser.parse_args()
    load_start = list(os.getloadavg())
    result = run(args.models, args.images, args.batch)
    write_result("calibration", {"load_average_1_5_15min_start": load_start, **result})
    for model, r in result["models"].items():
        print(
            f"{model}: knsparse {r['knsparse']['images_per_s']:.2f} img/s, hook reference "
            f"{r['hook_reference']['images_per_s']:.2f} img/s ({r['speedup_vs_reference']:.2f}x), "
            f"max rel diff {r['max_rel_diff_vs_reference']:.1e}"
        )


if __name__ == "__main__":
    main()
