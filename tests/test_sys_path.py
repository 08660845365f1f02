"""The repository root stays off ``sys.path`` when the tests run the way ``make test`` runs them.

The top-level ``kernels/`` (installed as ``knsparse.kernels``) would otherwise shadow Hugging
Face's ``kernels`` package, which ``transformers`` >= 5 imports when it is installed.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
OWN_KERNELS = ROOT / "kernels"


def _on_path(entry: str) -> bool:
    return Path(entry or ".").resolve() == ROOT


def test_repository_root_is_not_on_sys_path() -> None:
    assert not any(_on_path(p) for p in sys.path), [p for p in sys.path if _on_path(p)]


def test_top_level_kernels_is_reached_only_as_knsparse_kernels() -> None:
    spec = importlib.util.find_spec("kernels")
    assert spec is None or not Path(spec.origin or "").resolve().is_relative_to(OWN_KERNELS), spec.origin
    own = importlib.util.find_spec("knsparse.kernels")
    assert own is not None and Path(own.origin).resolve().is_relative_to(OWN_KERNELS)


@pytest.mark.models
def test_transformers_hub_kernels_imports_hugging_face_kernels() -> None:
    """What broke ``make test-models``: transformers importing ``from kernels import ...``."""
    pytest.importorskip("transformers")
    from transformers.utils.import_utils import is_kernels_available

    if not is_kernels_available():
        pytest.skip("Hugging Face's kernels package is not installed in a version transformers uses")
    from transformers.integrations import hub_kernels

    assert hub_kernels.get_kernel_hub.__module__.split(".")[0] == "kernels"
    hub = sys.modules["kernels"]
    assert not Path(hub.__file__).resolve().is_relative_to(OWN_KERNELS), hub.__file__
