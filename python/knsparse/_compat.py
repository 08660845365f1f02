"""Old module paths keep working: ``import knsparse.masks`` still gives the module that now lives
at ``knsparse.core.masks``, with a ``DeprecationWarning`` naming the new path.

The package was flat until 0.1 (29 top-level modules); the names below are where each one went.
A finder on ``sys.meta_path`` answers imports of an old path (``import knsparse.export``,
``from knsparse.methods.obs import damped``) with the module at its new path, and
``knsparse.<old name>`` as an attribute does the same through the package's ``__getattr__``.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import sys
import warnings
from types import ModuleType

MOVED = {
    "pattern": "core.pattern",
    "masks": "core.masks",
    "compress": "core.compress",
    "pack": "core.pack",
    "checks": "core.checks",
    "plan": "core.plan",
    "layers": "core.layers",
    "cache": "utils.cache",
    "provenance": "utils.provenance",
    "modes": "utils.modes",
    "batches": "utils.batches",
    "distributed": "utils.distributed",
    "prune": "pruning.prune",
    "calibration": "pruning.calibration",
    "spectral": "pruning.spectral",
    "repair": "pruning.repair",
    "finetune": "pruning.finetune",
    "score": "pruning.score",
    "budget": "pruning.budget",
    "methods": "pruning.methods",
    "permutation": "pruning.permutation",
    "modules": "sparse.modules",
    "fuse": "sparse.fuse",
    "densify": "sparse.densify",
    "io": "sparse.io",
    "export": "deploy.export",
    "onnx_check": "deploy.onnx_check",
    "audit": "deploy.audit",
    "macs": "deploy.macs",
    "tome": "deploy.tome",
    "families": "integrations.families",
    "mha": "integrations.mha",
}
"""``{old module under knsparse: its path under knsparse now}`` (subpackages move whole)."""


def new_path(name: str) -> str | None:
    """The current dotted path of the old module path ``name`` (``knsparse.methods.obs`` →
    ``knsparse.pruning.methods.obs``), or ``None`` when ``name`` did not move."""
    head, _, rest = name.removeprefix("knsparse.").partition(".")
    if not name.startswith("knsparse.") or head not in MOVED:
        return None
    return f"knsparse.{MOVED[head]}" + (f".{rest}" if rest else "")


def moved_module(old: str, stacklevel: int = 3) -> ModuleType:
    """Import the module an old path names, warning once per call site."""
    new = new_path(old)
    assert new is not None
    warnings.warn(f"{old} moved to {new}; import it from there", DeprecationWarning, stacklevel=stacklevel)
    return importlib.import_module(new)


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Answers an import of an old path with the module at its new path (the same object)."""

    def find_spec(self, fullname: str, path: object = None, target: object = None):
        if new_path(fullname) is None:
            return None
        return importlib.machinery.ModuleSpec(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        return moved_module(spec.name, stacklevel=6)

    def exec_module(self, module: ModuleType) -> None:
        """The module at the new path has already run."""


SHADOWED = ("prune", "finetune", "audit", "macs")
"""Old module names that are now the facade's functions (``ks.prune``): their old paths are
registered up front, without a warning, since a first import through the finder would set
``knsparse.prune`` to the module and hide the function."""


def install() -> None:
    """Put the finder on ``sys.meta_path`` (once) and register the :data:`SHADOWED` paths."""
    for name in SHADOWED:
        sys.modules.setdefault(f"knsparse.{name}", importlib.import_module(f"knsparse.{MOVED[name]}"))
    if not any(isinstance(f, _MovedModules) for f in sys.meta_path):
        sys.meta_path.insert(0, _MovedModules())  # before the path finder, which would load a second copy
