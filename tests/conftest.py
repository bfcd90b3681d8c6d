"""Shared fixtures: tiny models, a fake image-folder tree, Hydra composition, console scripts."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

import pytest
import torch
from PIL import Image

from tta.models import VisionLanguageModel, create_vlm

# The test models are tiny: a second intra-op thread gains nothing, and on a busy 2-core machine
# it makes every op wait for a core (several times slower overall).
torch.set_num_threads(1)

#: The three tiny tower kinds registered by the package (random weights, no download).
TINY_MODELS = ("tta-tiny-clip", "tta-tiny-customtext", "tta-tiny-sigmoid")


def make_tiny_vlm(name: str, seed: int = 0) -> VisionLanguageModel:
    torch.manual_seed(seed)
    return create_vlm(name)


@pytest.fixture(params=TINY_MODELS)
def tiny_vlm(request) -> VisionLanguageModel:
    """Each tiny tower kind in turn, freshly built (so caches and grads never leak between tests)."""
    return make_tiny_vlm(request.param)


@pytest.fixture(scope="session")
def shipped_vlm() -> VisionLanguageModel:
    return create_vlm("tta-world-clip")


def save_image(path: Path, mode: str = "RGB", size: tuple[int, int] = (40, 30), seed: int = 0) -> Path:
    """A random image of ``mode`` ("RGB", "L", "RGBA") saved with PIL."""
    g = torch.Generator().manual_seed(seed)
    channels = {"RGB": 3, "L": 1, "RGBA": 4}[mode]
    pixels = torch.randint(0, 256, (size[1], size[0], channels), generator=g, dtype=torch.uint8)
    array = pixels.squeeze(-1).numpy() if channels == 1 else pixels.numpy()
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array, mode=mode).save(path)
    return path


#: Folder name -> image modes of the fake tree; sorted order is apple, golden_retriever, zebra_fish.
FAKE_TREE = {
    "zebra_fish": ("RGB", "RGB"),
    "apple": ("RGB", "L"),
    "golden_retriever": ("RGBA", "RGB", "RGB"),
}


@pytest.fixture
def image_tree(tmp_path) -> Path:
    """``root/<class>/<img>.png`` with grayscale and RGBA images among the RGB ones."""
    root = tmp_path / "images"
    for k, (folder, modes) in enumerate(FAKE_TREE.items()):
        for i, mode in enumerate(modes):
            save_image(root / folder / f"img_{i}.png", mode, size=(40 + 8 * i, 30), seed=10 * k + i)
    return root


@pytest.fixture
def compose() -> Callable[..., object]:
    """``compose(overrides)``: the ``predict`` config of the package with Hydra overrides."""
    from hydra import compose as hydra_compose
    from hydra import initialize_config_module

    with initialize_config_module(config_module="tta.configs", version_base="1.3"):
        yield lambda overrides=(): hydra_compose("predict", overrides=list(overrides))


def console_script(name: str) -> Path:
    """A console script of the package, installed next to the running interpreter."""
    path = Path(sys.executable).parent / name
    if not path.exists():
        pytest.fail(f"console script {name} is not installed in {path.parent}")
    return path


def run_script(name: str, args: Sequence[str], cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    """Run a console script with a fixed terminal environment and capture its output."""
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    return subprocess.run([str(console_script(name)), *args], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=timeout)
