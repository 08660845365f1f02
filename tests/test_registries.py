"""Open registries: a method, a backend and a family registered from outside the package, used
through ``prune``, ``swap_modules`` and the CLI (as a ``knsparse.plugins`` entry point)."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import knsparse as ks
from knsparse import backends
from knsparse.backends.reference import ReferenceBackend
from knsparse.integrations import families
from knsparse.models import vit_tiny_digits
from knsparse.pruning.methods import METHODS, Decision


@pytest.fixture
def registries():
    """Every registration made by a test is undone after it."""
    saved = (
        dict(METHODS),
        dict(backends._REGISTRY),
        list(backends._auto_order_cuda),
        list(families.FAMILIES),
    )
    yield
    METHODS.clear(), METHODS.update(saved[0])
    backends._REGISTRY.clear(), backends._REGISTRY.update(saved[1])
    backends._auto_order_cuda[:] = saved[2]
    families.FAMILIES[:] = saved[3]


def lowest_first(layers, pattern, sparsity, *, flip: bool = True):
    """A deliberately odd method: keeps the k *smallest* |w| of every group (so it is visibly
    not magnitude)."""
    out = {}
    for name, lay in layers.items():
        scores = -lay.weight.abs() if flip else lay.weight.abs()
        out[name] = Decision(ks.nm_mask(scores, pattern, name=name), "lowest-first", pattern.sparsity)
    return out


class CountingBackend(ReferenceBackend):
    name = "counting"
    calls = 0

    def linear(self, x2d, operand, bias, activation="none"):
        type(self).calls += 1
        return super().linear(x2d, operand, bias, activation)


def test_an_outside_method_runs_through_prune(registries) -> None:
    ks.register_method("lowest-first", patterns="kn")(lowest_first)
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    result = ks.prune(model, "lowest-first", "2:4", progress=False)
    w = model.blocks[0].mlp.fc1.weight
    assert torch.equal(result.masks["blocks.0.mlp.fc1"], ks.nm_mask(-w.abs(), "2:4"))
    assert result.config.method.options == {"flip": True}  # its keyword-only parameter is an option
    assert ks.PruneConfig.from_dict(result.config.to_dict()) == result.config
    with pytest.raises(ValueError, match="already registered"):
        ks.register_method("lowest-first")(lowest_first)
    with pytest.raises(ValueError, match="does not support unstructured"):
        ks.prune(model, "lowest-first", sparsity=0.5, progress=False)


def test_an_outside_backend_runs_through_swap_modules(registries) -> None:
    ks.register_backend(CountingBackend)
    assert "counting" in backends.names()
    torch.manual_seed(0)
    model = vit_tiny_digits().eval()
    plan = ks.prune(model, "magnitude", "2:4", progress=False).plan
    report = ks.swap_modules(model, plan, backend="counting")
    assert set(report.swapped.values()) == {"counting"}
    model(torch.randn(2, 1, 8, 8))
    assert CountingBackend.calls > 0
    with pytest.raises(TypeError, match="Backend"):
        ks.register_backend(object())
    with pytest.raises(ValueError, match="other than 'auto'"):
        ks.register_backend(type("Auto", (ReferenceBackend,), {"name": "auto"}))


def test_an_outside_family_is_recognised_by_every_stage(registries) -> None:
    class FeedForward(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc1, self.act, self.fc2 = nn.Linear(8, 32), nn.GELU(), nn.Linear(32, 8)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc2(self.act(self.fc1(x)))

    model = nn.Sequential(FeedForward()).eval()
    ks.swap_modules(model, {"0.fc1": ks.nm_mask(model[0].fc1.weight.abs(), "2:4")})
    assert ks.fuse_activations(model) == {}
    ks.register_family(
        families.Family("mine", mlp=(families.ClassRef(FeedForward.__module__, "FeedForward"),))
    )
    x = torch.randn(2, 8)
    before = model(x)
    assert ks.fuse_activations(model) == {"0.fc1": "gelu"}
    torch.testing.assert_close(model(x), before)
    with pytest.raises(ValueError, match="already registered"):
        ks.register_family(families.Family("mine"))


PLUGIN = '''
"""A knsparse plugin outside the package: a method and a backend."""
import knsparse as ks
from knsparse.backends.reference import ReferenceBackend
from knsparse.pruning.methods import Decision


@ks.register_method("plugin-lowest", patterns="kn")
def lowest(layers, pattern, sparsity):
    return {
        n: Decision(ks.nm_mask(-lay.weight.abs(), pattern, name=n), "plugin-lowest", pattern.sparsity)
        for n, lay in layers.items()
    }


@ks.register_backend
class PluginBackend(ReferenceBackend):
    name = "plugin-reference"
'''


def test_the_cli_loads_plugins_from_entry_points(tmp_path: Path) -> None:
    """A distribution on sys.path whose ``knsparse.plugins`` entry point registers a method and
    a backend: ``knsparse prune`` offers both, in a fresh process."""
    site = tmp_path / "site"
    (site / "myplugin").mkdir(parents=True)
    (site / "myplugin" / "__init__.py").write_text(textwrap.dedent(PLUGIN))
    info = site / "myplugin-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: myplugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[knsparse.plugins]\nmine = myplugin\n")
    out = tmp_path / "pruned.safetensors"
    code = textwrap.dedent(
        f"""
        import sys
        sys.path.insert(0, {str(site)!r})
        from knsparse.cli import main
        sys.exit(main(["prune", "--model", "vit_tiny_digits", "--method", "plugin-lowest",
                       "--backend", "plugin-reference", "--out", {str(out)!r}, "--quiet"]))
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "backend=plugin-reference" in done.stdout and out.is_file()
    bad = info / "entry_points.txt"
    bad.write_text("[knsparse.plugins]\nbroken = myplugin_missing\n")
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=600, cwd=tmp_path
    )
    assert done.returncode == 2 and "plugin 'broken'" in done.stderr
