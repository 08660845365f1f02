"""The table of a pytest-benchmark run of ``bench/pytest_bench`` (``make bench-cpu``).

Reads the ``--benchmark-json`` file, adds knsparse's provenance block (device, versions, git
commit, host load: :func:`_meta.write_result`) to it, and writes a markdown table beside it:
one row per op with the median seconds of knsparse and of its plain-PyTorch reference (same
input, same run) and ``reference / knsparse`` (above 1: knsparse is faster).

    python bench/pytest_bench_report.py bench/results/pytest_bench_cpu.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from _meta import write_result


def rows(payload: dict) -> list[dict]:
    """``[{op, knsparse, reference, ratio, ratio_of_minima, info}]`` from pytest-benchmark's
    ``benchmarks`` list (seconds; ``None`` where one side did not run, e.g. skipped). The ratio of
    the fastest calls is the steadier one on a busy host: other jobs only ever add time."""
    by_op: dict[str, dict] = {}
    for bench in payload["benchmarks"]:
        info = dict(bench.get("extra_info", {}))
        op, impl = info.pop("op", bench["group"]), info.pop("impl", bench["param"])
        entry = by_op.setdefault(op, {"op": op, "knsparse": None, "reference": None, "info": info})
        entry[impl] = {
            "median": bench["stats"]["median"],
            "min": bench["stats"]["min"],
            "iqr": bench["stats"]["iqr"],
            "rounds": bench["stats"]["rounds"],
        }
    out = []
    for entry in by_op.values():
        ours, ref = entry["knsparse"], entry["reference"]
        entry["ratio"] = ref["median"] / ours["median"] if ours and ref else None
        entry["ratio_of_minima"] = ref["min"] / ours["min"] if ours and ref else None
        out.append(entry)
    return out


def _time(cell: dict | None) -> str:
    if cell is None:
        return "—"
    median, iqr = cell["median"], cell["iqr"]
    scale, unit = (1e3, "ms") if median >= 1e-3 else (1e6, "µs")
    return f"{median * scale:.3g} {unit} (IQR {iqr * scale:.3g} {unit}, {cell['rounds']} rounds)"


def markdown(table: list[dict], env: dict, run_at: str) -> str:
    threads = sorted({row["info"].get("threads", env["torch_threads"]) for row in table})
    versions = ", ".join(f"{k} {v}" for k, v in env["versions"].items() if k in ("python", "torch", "numpy"))
    load = env.get("load_average_1_5_15min_at_write")
    lines = [
        "# CPU ops against their PyTorch references (`make bench-cpu`, pytest-benchmark)",
        "",
        f"{env['device']}, {'/'.join(map(str, threads))} torch threads, {versions}, commit {env['commit']}, "
        f"run {run_at}" + (f"; load average {load[0]:.1f} / {load[1]:.1f} / {load[2]:.1f}" if load else ""),
        "",
        "Median wall-clock seconds per call, same input for both, outputs checked equal before timing "
        "(`bench/pytest_bench/test_cpu_ops.py` says what each reference is). "
        "ratio = reference / knsparse of the medians (above 1: knsparse is faster); "
        "min ratio = the same of the fastest calls, steadier on a busy host. "
        "A loaded machine slows both columns; rerun on a quiet one before quoting a figure.",
        "",
        "| op | knsparse | reference | ratio | min ratio | input |",
        "| --- | ---: | ---: | ---: | ---: | --- |",
    ]
    for row in table:
        ratio, floor = (f"{r:.2f}x" if r is not None else "—" for r in (row["ratio"], row["ratio_of_minima"]))
        info = ", ".join(f"{k}={v}" for k, v in row["info"].items() if k != "threads")
        lines.append(
            f"| {row['op']} | {_time(row['knsparse'])} | {_time(row['reference'])} | {ratio} | {floor} "
            f"| {info} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("json", type=Path, help="the --benchmark-json file of bench/pytest_bench")
    args = parser.parse_args()
    payload = json.loads(args.json.read_text())
    payload.pop("environment", None)  # a rerun of this script replaces the block
    table = rows(payload)
    path = write_result(args.json.stem, {**payload, "summary": table})
    env = json.loads(path.read_text())["environment"]
    md = path.with_suffix(".md")
    md.write_text(markdown(table, env, payload.get("datetime", env["date"])))
    print(f"wrote {path} and {md}")


if __name__ == "__main__":
    main()
