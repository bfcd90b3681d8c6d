"""benchmarks/world_limits.py: the measurement behind docs/world.md's "what limits TPT, STS and LAME"."""

from __future__ import annotations

import importlib.util
import math
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def world_limits():
    spec = importlib.util.spec_from_file_location("world_limits", ROOT / "benchmarks" / "world_limits.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["world_limits"] = module
    spec.loader.exec_module(module)
    return module


def test_one_adamw_step_moves_each_context_coordinate_by_the_learning_rate(world_limits):
    # the premise of table 1: from a fresh state the first step is lr * sign(grad), whatever the gradient's scale
    for scale in (1e-2, 1.0, 1e3):
        context = torch.zeros(4, 64, requires_grad=True)
        optimizer = torch.optim.AdamW([context], lr=world_limits.LR, weight_decay=0.01)
        (scale * (context * torch.randn(4, 64)).sum()).backward()
        optimizer.step()
        torch.testing.assert_close(context.detach().abs(), torch.full((4, 64), world_limits.LR), rtol=1e-2, atol=0)


def test_the_trained_world_tower_is_less_sensitive_to_its_context_than_at_initialisation(world_limits):
    trained = world_limits.step_scale("tta-world-resnet", draws=4)
    fresh = world_limits.step_scale("tta-world-resnet@random", draws=4)
    assert trained["width"] == fresh["width"] == 64
    assert trained["step_norm"] == pytest.approx(world_limits.LR * math.sqrt(64))
    assert trained["move"] < fresh["move"] / 5  # the finding docs/world.md reports (16x at 20 draws)
    assert trained["nearest"] > fresh["nearest"]


def test_the_benchmark_writes_its_three_tables(world_limits, tmp_path):
    out = tmp_path / "limits.md"
    world_limits.main(["--n", "10", "--views", "4", "--scale-models", "tta-world-resnet@random", "--out", str(out)])
    text = out.read_text()
    for heading in ("## 1. One step", "## 2. Per domain", "## 2b. Does the context", "## 3. LAME's neighbourhoods"):
        assert heading in text
    assert "| shifted mean |" in text and "| tta-world-resnet@random | 64 |" in text
