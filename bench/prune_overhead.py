"""What ``knsparse.prune`` costs beyond the masks themselves, on ViT-B/16's blocks (CPU).

Goal (the stage-contract issue): ``prune(model, "magnitude", "2:4")`` on ViT-B/16's blocks within
1.5x of ``nm_mask`` applied layer by layer, and the peak memory of ``prune(inplace=True)`` at
most 2x the model's weights. Two measurements, each in a fresh process:

* time: the baseline is the loop a user would write — for every Linear of the 12 blocks (qkv,
  proj, fc1, fc2: 48 layers), ``mask = nm_mask(|w|, "2:4")`` and ``w *= mask`` — against
  ``prune(model.blocks, "magnitude", "2:4", inplace=True)`` and with ``inplace=False`` (one deep
  copy of the model), interleaved, medians of ``--repeats`` runs on fresh weights; also the
  24 MLP layers alone (``keep_dense`` the attention), the case the issue measured;
* memory: the process's peak resident set (``VmHWM``, reset through ``/proc/self/clear_refs``
  after the model is built) above the resident set before the call, for ``prune(inplace=True)``
  and for the ``nm_mask`` loop; the model's share is its weights (``numel x 4`` bytes).
  ``tracemalloc`` would not see them: torch allocates its tensors outside Python's allocator.
  Twice: with glibc's default allocator (what a user's process shows; glibc keeps freed blocks
  below its dynamic mmap threshold for reuse, so long-lived allocations interleaved with
  temporaries inflate it) and with every allocation above 64 KiB mapped on its own, where the
  resident set follows the live allocations.

Writes ``bench/results/prune_overhead.json`` and ``prune_overhead.md``.
Run: ``.venv/bin/python bench/prune_overhead.py``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
from _meta import write_result

import knsparse as ks
from knsparse.models import vit_base_patch16_224

GOAL_TIME_RATIO = 1.5
GOAL_MEMORY_RATIO = 2.0
ATTENTION = ("*.attn.*",)


def blocks() -> torch.nn.Module:
    torch.manual_seed(0)
    return vit_base_patch16_224().blocks.eval()


def nm_mask_loop(model: torch.nn.Module, skip: tuple[str, ...]) -> None:
    """The baseline: every Linear of ``model`` (not matching ``skip``) masked in place."""
    import fnmatch

    with torch.no_grad():
        for name, m in model.named_modules():
            if isinstance(m, torch.nn.Linear) and not any(fnmatch.fnmatchcase(name, g) for g in skip):
                m.weight.mul_(ks.nm_mask(m.weight.abs(), "2:4", name=name))


def timing(repeats: int) -> dict[str, object]:
    cases = {
        "blocks (48 layers)": (),
        "MLP layers (24 layers)": ATTENTION,
    }
    out = {}
    for label, skip in cases.items():
        runs: dict[str, list[float]] = {
            "nm_mask loop": [],
            "prune inplace=True": [],
            "prune inplace=False": [],
        }
        for _ in range(repeats):
            for name in runs:  # interleaved: drift hits every variant alike
                model = blocks()
                start = time.perf_counter()
                if name == "nm_mask loop":
                    nm_mask_loop(model, skip)
                else:
                    ks.prune(
                        model,
                        "magnitude",
                        "2:4",
                        inplace=name.endswith("True"),
                        keep_dense=skip,
                        progress=False,
                    )
                runs[name].append(time.perf_counter() - start)
        medians = {k: statistics.median(v) for k, v in runs.items()}
        base = medians["nm_mask loop"]
        out[label] = {
            "median_s": medians,
            "all_s": runs,
            "ratio_to_nm_mask": {k: v / base for k, v in medians.items()},
        }
    return out


MEMORY_CHILD = """
import json, sys, torch
sys.path.insert(0, {bench!r})
from prune_overhead import blocks, nm_mask_loop
import knsparse as ks

def rss(field):
    for line in open("/proc/self/status"):
        if line.startswith(field):
            return int(line.split()[1]) * 1024
model = blocks()
weights = sum(p.numel() * p.element_size() for p in model.parameters())
before = rss("VmRSS:")
open("/proc/self/clear_refs", "w").write("5")  # reset the peak to the current resident set
if {variant!r} == "prune":
    ks.prune(model, "magnitude", "2:4", inplace=True, progress=False)
else:
    nm_mask_loop(model, ())
peak = rss("VmHWM:")
print(json.dumps({{"weights_bytes": weights, "rss_before": before, "peak_rss": peak}}))
"""


ALLOCATORS = {
    "glibc default": {},
    # Every allocation above 64 KiB its own mapping, returned to the system when freed: the
    # resident set then follows the live allocations instead of what glibc keeps for reuse.
    "live allocations (MALLOC_MMAP_THRESHOLD_=65536)": {"MALLOC_MMAP_THRESHOLD_": "65536"},
}


def memory() -> dict[str, object]:
    out: dict[str, object] = {}
    for allocator, env in ALLOCATORS.items():
        for variant in ("prune", "nm_mask loop"):
            code = MEMORY_CHILD.format(bench=str(Path(__file__).resolve().parent), variant=variant)
            done = subprocess.run(
                [sys.executable, "-c", code],
                capture_output=True,
                text=True,
                check=True,
                env={**os.environ, **env},
            )
            row = json.loads(done.stdout.strip().splitlines()[-1])
            extra = row["peak_rss"] - row["rss_before"]
            row["extra_bytes"] = extra
            row["peak_over_weights"] = (row["weights_bytes"] + extra) / row["weights_bytes"]
            out[f"{variant}, {allocator}"] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    times = timing(args.repeats)
    mem = memory()
    blocks_ratio = times["blocks (48 layers)"]["ratio_to_nm_mask"]["prune inplace=True"]
    rss = mem["prune, glibc default"]["peak_over_weights"]
    live = mem["prune, live allocations (MALLOC_MMAP_THRESHOLD_=65536)"]["peak_over_weights"]
    payload = {
        "benchmark": "knsparse.prune(magnitude, 2:4) vs nm_mask layer by layer, ViT-B/16 blocks, CPU",
        "threads": torch.get_num_threads(),
        "repeats": args.repeats,
        "timing": times,
        "memory": mem,
        "goals": {
            "time_ratio_at_most": GOAL_TIME_RATIO,
            "time_ratio_measured_inplace": blocks_ratio,
            "time_goal_met": blocks_ratio <= GOAL_TIME_RATIO,
            "memory_ratio_at_most": GOAL_MEMORY_RATIO,
            "memory_ratio_rss_glibc_default": rss,
            "memory_ratio_live_allocations": live,
            "memory_goal_met_by_rss": rss <= GOAL_MEMORY_RATIO,
            "memory_goal_met_by_live_allocations": live <= GOAL_MEMORY_RATIO,
        },
    }
    path = write_result("prune_overhead", payload)
    path.with_suffix(".md").write_text(markdown(payload, json.loads(path.read_text())["environment"]))
    print(json.dumps(payload["goals"], indent=2))
    print(f"wrote {path} and {path.with_suffix('.md').name}")


def markdown(payload: dict, env: dict) -> str:
    """The tables of ``payload`` as the results page links them."""
    lines = [
        "# `prune` overhead: magnitude 2:4 on ViT-B/16's blocks (`bench/prune_overhead.py`)",
        "",
        f"{env['device']}, {payload['threads']} threads, torch {env['versions']['torch']}, commit "
        f"{env['commit'][:12]}, {payload['repeats']} interleaved repeats (medians), load average at the "
        f"end {[round(x, 1) for x in env.get('load_average_1_5_15min_at_write', [])]}.",
        "",
        "| layers | `nm_mask` loop | `prune` inplace=True | `prune` inplace=False | ratio (inplace) |",
        "| --- | --- | --- | --- | --- |",
    ]
    for layers, row in payload["timing"].items():
        t, ratio = row["median_s"], row["ratio_to_nm_mask"]
        lines.append(
            f"| {layers} | {t['nm_mask loop']:.2f} s | {t['prune inplace=True']:.2f} s | "
            f"{t['prune inplace=False']:.2f} s | {ratio['prune inplace=True']:.2f}x |"
        )
    lines += ["", "Peak memory above the weights (weights + extra resident bytes, over the weights):", ""]
    lines += ["| call, allocator | weights | extra at peak | peak / weights |", "| --- | --- | --- | --- |"]
    for name, row in payload["memory"].items():
        lines.append(
            f"| {name} | {row['weights_bytes'] / 2**20:.0f} MiB | {row['extra_bytes'] / 2**20:.0f} MiB | "
            f"{row['peak_over_weights']:.2f}x |"
        )
    g = payload["goals"]
    lines += [
        "",
        f"Goals: time within {g['time_ratio_at_most']}x of the loop: "
        f"{'met' if g['time_goal_met'] else 'not met'} ({g['time_ratio_measured_inplace']:.2f}x); peak "
        f"memory at most {g['memory_ratio_at_most']}x the weights: by live allocations "
        f"{'met' if g['memory_goal_met_by_live_allocations'] else 'not met'} "
        f"({g['memory_ratio_live_allocations']:.2f}x), by the resident set with glibc's default "
        f"allocator {'met' if g['memory_goal_met_by_rss'] else 'not met'} "
        f"({g['memory_ratio_rss_glibc_default']:.2f}x: glibc keeps freed blocks for reuse).",
        "",
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
