"""The cached micro-benchmark behind backend="auto" (knsparse.backends.autotune)."""

from __future__ import annotations

import json

import pytest
import torch

from knsparse import backends
from knsparse.backends import REFERENCE, autotune
from knsparse.backends.base import ConvSpec, LinearSpec
from knsparse.backends.reference import ReferenceBackend
from knsparse.core.pattern import Pattern

PATTERN = Pattern.parse("2:4")
LINEAR = LinearSpec(32, 64, torch.float32, PATTERN, torch.device("cpu"))
CONV = ConvSpec(16, 8, (3, 3), (1, 1), (1, 1), (1, 1), 1, torch.float32, PATTERN, torch.device("cpu"))


class Named(ReferenceBackend):
    def __init__(self, name: str) -> None:
        self.name = name


class Timer:
    """A deterministic stand-in for the stopwatch, counting its calls."""

    def __init__(self, seconds: dict[str, float]) -> None:
        self.seconds = seconds
        self.calls: list[str] = []

    def __call__(self, backend, spec) -> float:
        self.calls.append(backend.name)
        return self.seconds[backend.name]


@pytest.fixture(autouse=True)
def fresh_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("KNSPARSE_CACHE", str(tmp_path))
    autotune.clear_memory()
    yield
    autotune.clear_memory()


def test_picks_the_lowest_time_and_measures_each_shape_once():
    slow, fast = Named("slow"), Named("fast")
    timer = Timer({"slow": 2e-3, "fast": 1e-3})
    best, timings = autotune.fastest([slow, fast], LINEAR, timer)
    assert best is fast and timings == {"slow": 2e-3, "fast": 1e-3}
    assert autotune.fastest([slow, fast], LINEAR, timer)[0] is fast
    assert sorted(timer.calls) == ["fast", "slow"]  # the second call came from the cache
    autotune.fastest([slow, fast], CONV, timer)
    assert len(timer.calls) == 4  # another shape is measured anew


def test_ties_keep_the_documented_order():
    first, second = Named("first"), Named("second")
    best, _ = autotune.fastest([first, second], LINEAR, Timer({"first": 1.0, "second": 1.0}))
    assert best is first


def test_timings_persist_on_disk_across_processes():
    a, b = Named("a"), Named("b")
    autotune.fastest([a, b], LINEAR, Timer({"a": 3.0, "b": 1.0}))
    stored = json.loads(autotune.cache_path().read_text())
    assert stored[autotune.spec_key(LINEAR)] == {"a": 3.0, "b": 1.0}
    autotune.clear_memory()  # as in a new process
    timer = Timer({"a": 0.0, "b": 9.0})
    best, _ = autotune.fastest([a, b], LINEAR, timer)
    assert best is b and timer.calls == []


def test_a_new_candidate_triggers_a_new_measurement():
    a, b, c = Named("a"), Named("b"), Named("c")
    autotune.fastest([a, b], LINEAR, Timer({"a": 3.0, "b": 2.0}))
    timer = Timer({"a": 3.0, "b": 2.0, "c": 1.0})
    best, _ = autotune.fastest([a, b, c], LINEAR, timer)
    assert best is c and sorted(timer.calls) == ["a", "b", "c"]


def test_an_unreadable_cache_file_is_measured_again_and_rewritten():
    autotune.cache_path().write_text("{not json")
    timer = Timer({"a": 1.0})
    autotune.fastest([Named("a")], LINEAR, timer)
    assert timer.calls == ["a"]
    assert autotune.spec_key(LINEAR) in json.loads(autotune.cache_path().read_text())


def test_no_candidate_is_an_error():
    with pytest.raises(ValueError, match="no backend"):
        autotune.fastest([], LINEAR)


@pytest.mark.parametrize("spec", [LINEAR, CONV], ids=["linear", "conv"])
def test_the_real_stopwatch_runs_the_layer_shape(spec):
    seconds = autotune.measure(REFERENCE, spec)
    assert seconds > 0.0


def test_the_switch_reads_the_environment(monkeypatch):
    monkeypatch.setenv("KNSPARSE_AUTOTUNE", "0")
    assert not autotune.enabled()
    monkeypatch.setenv("KNSPARSE_AUTOTUNE", "1")
    assert autotune.enabled()


def test_cpu_layers_resolve_to_the_reference_without_measuring():
    assert backends.resolve("auto", LINEAR)[0] is REFERENCE
    assert not autotune.cache_path().exists()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_on_cuda_benchmarks_the_candidates_it_has():
    spec = LinearSpec(3072, 768, torch.float16, PATTERN, torch.device("cuda"))
    backend, why = backends.resolve("auto", spec)
    assert backend is not None and backend.name in backends.names()
    assert "auto" in why


class Failing(ReferenceBackend):
    name = "failing"

    def linear(self, x2d, operand, bias):
        raise RuntimeError("kernel launch failed")


def test_a_backend_that_fails_on_the_shape_loses_instead_of_failing_the_swap():
    best, timings = autotune.fastest([Failing(), REFERENCE], LINEAR)
    assert best is REFERENCE and timings["failing"] == float("inf")
    autotune.clear_memory()
    assert autotune.fastest([Failing(), REFERENCE], LINEAR)[0] is REFERENCE  # inf survives the disk cache


def test_every_candidate_failing_is_an_error():
    with pytest.raises(RuntimeError, match="every candidate backend failed"):
        autotune.fastest([Failing()], LINEAR)
