"""The production-scale speed figures on a CUDA device, for bench/gpu_session.sh.

* whole-model channel permutation: ``permute(model, "2:4", calib=[x])`` with its defaults on
  timm ``resnet50`` and ``vit_base_patch16_224`` (random init) on the GPU, output checked
  unchanged (issue: <= 20 s each on 2 CPU cores; the CPU figures are in bench/results/speed.json);
* one-shot ``sparsegpt`` and ``sparsegpt-refit`` (the default k:n method) on the 12 blocks of
  knsparse's ViT-B/16-shaped model, calibrated on 16 images' tokens, as
  ``bench/sparsegpt_speed.py`` does on the CPU (issue: a few seconds on a GPU).

Every figure is wall-clock seconds after one untimed warm-up run of the same call (CUDA context,
kernel loading), with ``torch.cuda.synchronize()`` before each clock read. Writes
``speed_gpu.json`` to ``$KNSPARSE_RESULTS_DIR`` (default bench/results/). Without CUDA it says so
and exits 0 (the dry run of the session script).
"""

from __future__ import annotations

import copy
import time

import torch
from _meta import write_result

from knsparse import permute
from knsparse.models import vit_base_patch16_224
from knsparse.pruning.prune import prune


def timed(fn) -> tuple[float, object]:
    """Seconds of one call after an untimed warm-up call, and the timed call's result."""
    fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    out = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - start, out


def permutation(device: torch.device) -> dict:
    import timm

    rows = {}
    for name in ("resnet50", "vit_base_patch16_224"):
        model = timm.create_model(name, pretrained=False).eval().to(device)
        x = torch.randn(1, 3, 224, 224, generator=torch.Generator().manual_seed(0)).to(device)
        seconds, report = timed(lambda m=model, x=x: permute(m, "2:4", calib=[x], inplace=False))
        effs = [g.efficacy for g in report.permuted]
        rows[name] = {
            "seconds": seconds,
            "groups": len(report.groups),
            "groups_permuted": len(effs),
            "mean_efficacy": sum(effs) / max(len(effs), 1),
        }
        print(name, rows[name], flush=True)
    return rows


def oneshot(device: torch.device, images: int = 16) -> dict:
    torch.manual_seed(0)
    model = vit_base_patch16_224().eval().to(device)
    tokens: list[torch.Tensor] = []
    hook = model.blocks.register_forward_pre_hook(lambda _, args: tokens.append(args[0]))
    with torch.no_grad():
        for batch in torch.randn(images, 3, 224, 224).split(8):
            model(batch.to(device))
    hook.remove()
    rows = {}
    for method in ("magnitude", "sparsegpt", "sparsegpt-refit"):
        blocks = copy.deepcopy(model.blocks)
        seconds, _ = timed(lambda b=blocks, m=method: prune(b, m, "2:4", calib=tokens, progress=False))
        rows[method] = {"seconds": seconds, "images": images}
        print(method, rows[method], flush=True)
    return rows


def main() -> None:
    if not torch.cuda.is_available():
        print("gpu_speed: no CUDA device, nothing measured")
        return
    device = torch.device("cuda")
    payload = {
        "benchmark": "permutation and one-shot SparseGPT at production scale on a CUDA device",
        "device": torch.cuda.get_device_name(),
        "permutation": permutation(device),
        "oneshot_vit_b16_blocks": oneshot(device),
    }
    print("wrote", write_result("speed_gpu", payload))


if __name__ == "__main__":
    main()
