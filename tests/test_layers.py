"""The layers import only the layers below them (README, docs/architecture.md)."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

#: folder -> imports it must not make (a prefix matches the module and its submodules)
FORBIDDEN = {
    "tta/models": ("tta.tasks", "tta.methods", "tta.callbacks", "tta.datamodules", "pytorch_lightning", "lightning"),
    "tta/methods": ("tta.tasks", "tta.callbacks", "tta.datamodules", "pytorch_lightning", "lightning", "hydra"),
    "tta/tasks": ("tta.callbacks", "tta.datamodules", "hydra"),
    "tta/augment": ("tta.tasks", "tta.methods", "tta.callbacks", "pytorch_lightning", "lightning"),
    "tta/metrics": ("tta.tasks", "tta.methods", "tta.callbacks", "pytorch_lightning", "lightning"),
    # the run folder is plain Python: the writer callback and the CLI adapt it
    "tta/run_folder.py": ("tta", "torch", "pytorch_lightning", "lightning", "hydra", "omegaconf"),
}


def imported_modules(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names.add(node.module)
    return names


@pytest.mark.parametrize("folder", sorted(FORBIDDEN))
def test_a_layer_imports_nothing_above_it(folder):
    offending = {}
    for path in [ROOT / folder] if folder.endswith(".py") else sorted((ROOT / folder).glob("*.py")):
        bad = sorted(
            m for m in imported_modules(path) if any(m == f or m.startswith(f + ".") for f in FORBIDDEN[folder])
        )
        if bad:
            offending[path.relative_to(ROOT).as_posix()] = bad
    assert not offending, f"imports that run up the layers: {offending}"
