"""Old module paths (the flat layout before 0.1) still import, with a DeprecationWarning naming
the new path, and give the very module at the new path."""

from __future__ import annotations

import importlib
import subprocess
import sys
import textwrap

import pytest

import knsparse as ks
from knsparse import _compat


@pytest.mark.parametrize(("old", "new"), sorted(_compat.MOVED.items()))
def test_every_moved_path_is_a_real_module(old: str, new: str) -> None:
    module = importlib.import_module(f"knsparse.{new}")
    assert module.__name__ == f"knsparse.{new}"


def test_old_paths_warn_and_give_the_same_module() -> None:
    """In a fresh interpreter: nothing imported the old paths yet."""
    code = textwrap.dedent(
        """
        import warnings
        import knsparse as ks
        from knsparse.core import masks as new_masks
        from knsparse.deploy import export as new_export
        from knsparse.pruning.methods import obs as new_obs
        with warnings.catch_warnings(record=True) as seen:
            warnings.simplefilter("always")
            import knsparse.masks as old_masks
            from knsparse.methods.obs import damped
            from knsparse.export import check
            via_attribute = ks.plan
        assert old_masks is new_masks and damped is new_obs.damped, "not the same module"
        assert check is new_export.check
        assert via_attribute.__name__ == "knsparse.core.plan"
        texts = [str(w.message) for w in seen if issubclass(w.category, DeprecationWarning)]
        assert any("knsparse.masks moved to knsparse.core.masks" in t for t in texts), texts
        assert any("knsparse.methods moved to knsparse.pruning.methods" in t for t in texts), texts
        from knsparse.prune import PruneResult  # an old path that is also a function's name
        assert callable(ks.prune) and ks.prune.__name__ == "prune", "ks.prune was hidden"
        print("ok")
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd="/", timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-2000:]


def test_an_unknown_attribute_is_still_an_attribute_error() -> None:
    with pytest.raises(AttributeError, match="no attribute 'nonexistent'"):
        ks.nonexistent  # noqa: B018
