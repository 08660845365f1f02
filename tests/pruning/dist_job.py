"""One job run by 1 process (in the test) and by N processes (torchrun): calibration
statistics, masks and repaired weights of a pruned ResNet, and a ViT after a few fine-tuning
steps. Rank 0 writes every result to ``OUT/results.safetensors``.

``torchrun --standalone --nproc-per-node N tests/pruning/dist_job.py OUT [--kill-rank R]``
(``--kill-rank R``: rank R kills itself in the middle of calibration).
"""

from __future__ import annotations

import argparse
import copy
import os
import signal
import sys

import torch
from safetensors.torch import save_file

import knsparse as ks
from knsparse.core.layers import pattern_layers
from knsparse.models import resnet_tiny_digits, vit_tiny_digits
from knsparse.pruning.calibration import collect_input_stats
from knsparse.utils import distributed


def calibration(seed: int = 0, batches: int = 6, size: int = 24) -> list[torch.Tensor]:
    # 144 images: layer4 sees one position per image, fewer rows than its re-fit needs (K = 1152):
    # those layers keep CAST's mask on the dense weights, the earlier ones are re-fitted.
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(size, 1, 8, 8, generator=g) for _ in range(batches)]


def run_job(device: torch.device | str = "cpu", kill_rank: int | None = None) -> dict[str, torch.Tensor]:
    """Every result of the job, by name (the same dict on every rank)."""
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    calib = [x.to(device) for x in calibration()]
    torch.manual_seed(0)
    resnet = resnet_tiny_digits().to(device).eval()
    layers, _ = pattern_layers(resnet, ks.Pattern.parse("2:4"))
    if kill_rank is not None and distributed.rank() == kill_rank:
        resnet.register_forward_hook(lambda *_: os.kill(os.getpid(), signal.SIGKILL))
    for name, st in collect_input_stats(resnet, layers, calib, group=4).items():
        out[f"stats/{name}/sum_sq"] = st.sum_sq.cpu()
        out[f"stats/{name}/block_gram"] = st.block_gram.cpu()
        out[f"stats/{name}/samples"] = torch.tensor(st.samples)
    for name, st in collect_input_stats(resnet, layers, calib[:1]).items():  # rank 1 gets no batch
        out[f"stats/one-batch/{name}/sum_sq"] = st.sum_sq.cpu()
    permuted = ks.permute(resnet, "2:4", calib, inplace=False, max_iters=2)
    for name, t in permuted.model.state_dict().items():
        out[f"permuted/{name}"] = t.cpu()
    result = ks.prune(resnet, "cast-conv", "2:4", calib=calib, repair="asr", progress=False)
    for name, mask in result.masks.items():
        out[f"masks/{name}"] = mask.cpu()
    for name, t in result.model.state_dict().items():
        out[f"repaired/{name}"] = t.cpu()

    torch.manual_seed(1)
    teacher = vit_tiny_digits().to(device).eval()
    student = copy.deepcopy(teacher)
    masks = ks.prune(student, "magnitude", "2:4", inplace=True, progress=False).masks
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(64, 1, 8, 8, generator=g), torch.randint(0, 10, (64,), generator=g)
    ks.finetune(
        student, teacher, (x, y), epochs=2, plan=masks, batch_size=16, lr=1e-3,
        label_weight=0.5, warmup=0.25, progress=False,
    )  # fmt: skip
    for name, t in student.state_dict().items():
        out[f"finetuned/{name}"] = t.cpu()
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out")
    parser.add_argument("--kill-rank", type=int)
    args = parser.parse_args()
    distributed.init()
    try:
        results = run_job(distributed.device(), args.kill_rank)
        if distributed.is_main():
            save_file(
                {k: v.contiguous() for k, v in results.items()}, os.path.join(args.out, "results.safetensors")
            )
        distributed.barrier()
    finally:
        distributed.shutdown()


if __name__ == "__main__":
    sys.exit(main())
