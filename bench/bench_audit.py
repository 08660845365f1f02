"""Dense vs 2:4 sparse throughput of the same weights, per batch size.

On CUDA: ViT-B/16 and ResNet-50 at 224 px (random weights, magnitude 2:4), fp16, CUDA graphs.
On CPU: the built-in digits models (trained or cached), float32 reference path, one torch
thread (their matrices are too small for a second one) — this measures the code path only;
no sparse tensor cores are involved.

Run: python bench/bench_audit.py   → bench/results/audit_<cuda|cpu>.json (rewritten after every
model) and .png; ``--fuse-activations`` fuses the MLP activations of the sparse copy
(``audit_<tag>_fused``); ``--timm`` audits timm's vit_base_patch16_224 and resnet50 on CUDA.
"""

from __future__ import annotations

import argparse

import torch
from _meta import write_result

from knsparse.app import pretrained
from knsparse.app.pipeline import magnitude_masks
from knsparse.deploy.audit import audit, plot_speedup
from knsparse.models import resnet50, vit_base_patch16_224

BATCH_SIZES = (1, 8, 32, 64, 128)


def _models(use_timm: bool = False) -> list[tuple[str, torch.nn.Module, tuple[int, int, int]]]:
    if torch.cuda.is_available():
        torch.manual_seed(0)
        if use_timm:
            import timm

            names = ("vit_base_patch16_224", "resnet50")
            return [(n, timm.create_model(n, pretrained=False).eval(), (3, 224, 224)) for n in names]
        return [
            ("vit_base_patch16_224", vit_base_patch16_224().eval(), (3, 224, 224)),
            ("resnet50", resnet50().eval(), (3, 224, 224)),
        ]
    torch.set_num_threads(1)
    return [(name, pretrained(name), (1, 8, 8)) for name in ("vit_tiny_digits", "resnet_tiny_digits")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fuse-activations",
        action="store_true",
        help="fuse MLP activations into the sparse fc1 (sparse copy only); writes audit_<tag>_fused",
    )
    parser.add_argument(
        "--timm",
        action="store_true",
        help="on CUDA: timm's models (random weights) instead of the built-in ones",
    )
    args = parser.parse_args()
    tag = ("cuda" if torch.cuda.is_available() else "cpu") + ("_fused" if args.fuse_activations else "")
    results = []
    for name, model, shape in _models(args.timm):
        masks, _ = magnitude_masks(model, "2:4")
        result = audit(
            model,
            shape,
            BATCH_SIZES,
            torch.float16,
            plan=masks,
            checkpoint=name,
            fuse_activations=args.fuse_activations,
        )
        print(result.to_markdown(), end="\n\n")
        results.append(result)
        # written after every model, so a time-out keeps the models already audited
        path = write_result(f"audit_{tag}", {"audits": [r.to_dict() for r in results]})
    plot_speedup(results, path.with_suffix(".png"))
    print(f"wrote {path} and {path.with_suffix('.png')}")


if __name__ == "__main__":
    main()
