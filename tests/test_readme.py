"""The README's API example runs as written."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"


@pytest.mark.slow
def test_readme_api_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    assert blocks, "README has no python example"
    monkeypatch.chdir(tmp_path)
    namespace: dict[str, object] = {}
    exec(compile(blocks[0], str(README), "exec"), namespace)
    report = namespace["report"]
    assert report.swapped and (tmp_path / "vit-24.safetensors").is_file()


@pytest.mark.slow
def test_readme_config_example_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The recipe example of "Configs, recipes and plugins" runs as written on a built-in ViT."""
    import torch

    from knsparse.models import vit_tiny_digits

    section = README.read_text().split("## Configs, recipes and plugins", 1)[1]
    block = re.search(r"```text\n(.*?)```", section, flags=re.S).group(1)
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    namespace: dict[str, object] = {
        "model": vit_tiny_digits(),
        "loader": [torch.randn(16, 1, 8, 8) for _ in range(2)],
    }
    exec(compile(block, str(README), "exec"), namespace)
    plan = namespace["result"].plan
    assert str(plan.pattern) == "2:4" and plan.permutation and "head" not in plan.masks
    assert (tmp_path / "recipe.json").is_file()
