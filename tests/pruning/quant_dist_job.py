"""The quantizer's statistics run by 1 process (in the test) and by N processes (torchrun):
input amax, percentile amax, scales and auto's held-out errors of a pruned ResNet. Rank 0
writes them to ``OUT/quant.safetensors``.

``torchrun --standalone --nproc-per-node N tests/pruning/quant_dist_job.py OUT``
"""

from __future__ import annotations

import os
import sys

import torch
from safetensors.torch import save_file

import knsparse as ks
from knsparse.models import resnet_tiny_digits
from knsparse.utils import distributed


def run_job() -> dict[str, torch.Tensor]:
    """Every statistic of the job, by name (the same dict on every rank)."""
    g = torch.Generator().manual_seed(0)
    calib = [torch.randn(8, 1, 8, 8, generator=g) for _ in range(7)]  # 7 batches: rank 0 gets 4
    torch.manual_seed(0)
    model = resnet_tiny_digits().eval()
    pruned = ks.prune(model, "magnitude", "2:4", progress=False)
    result = ks.quantize(pruned.model, pruned.plan, calib, percentile=99.0)
    out = {f"error/{k}": torch.tensor([v], dtype=torch.float64) for k, v in result.output_error.items()}
    for name in result.layers:
        out[f"scale/{name}"] = torch.tensor([result.input_scales[name]], dtype=torch.float64)
        for rule, amax in result.input_amax[name].items():
            out[f"amax/{rule}/{name}"] = torch.tensor([amax], dtype=torch.float64)
    return out


def main() -> None:
    distributed.init()
    try:
        results = run_job()
        if distributed.is_main():
            save_file(results, os.path.join(sys.argv[1], "quant.safetensors"))
        distributed.barrier()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
