"""MACs of ViT-B/16 and ResNet-50 at 224 px against the published dense figures, and the
reduction of 2:4 sparse execution (and 2:4 + token merging r=16 for ViT-B/16).

Run: python bench/bench_macs.py   → bench/results/macs.json
"""

from __future__ import annotations

from _meta import write_result

from knsparse.app.report import imagenet_macs
from knsparse.core.pattern import Pattern

PUBLISHED_DENSE_GMACS = {"vit_base_patch16_224": 17.56, "resnet50": 4.09}


def main() -> None:
    reports = imagenet_macs(Pattern.parse("2:4"))
    rows = {}
    for name, report in reports.items():
        base = name.split(" ")[0]
        dense = report.unmerged_dense_total / 1e9
        published = PUBLISHED_DENSE_GMACS[base]
        rows[name] = {
            "dense_gmacs": dense,
            "published_dense_gmacs": published,
            "dense_relative_error": dense / published - 1,
            "merged_dense_gmacs": report.dense_total / 1e9,
            "sparse_gmacs": report.sparse_total / 1e9,
            "reduction": report.reduction,
            "sparse_reduction": report.sparse_reduction,
            "merge_reduction": report.merge_reduction,
            "theoretical_speedup": report.theoretical_speedup,
        }
        print(f"{name:<36} {report.summary()}")
    path = write_result("macs", {"pattern": "2:4", "input_shape": [1, 3, 224, 224], "models": rows})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
