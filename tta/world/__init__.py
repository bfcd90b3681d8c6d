"""The offline world: seeded procedural scenes, captions and domain shifts.

``render_domain("blur", severity=3, n=500, seed=0)`` gives the same 500 scenes as the clean
domain with the same seed, seen through the shift, so domains differ by the shift alone.
"""

from __future__ import annotations

import zlib

import torch

from tta.world.scenes import (
    CAPTION_TEMPLATES,
    CLASS_NAMES,
    COLOUR_NAMES,
    RELATIONS,
    SHAPES,
    Scenes,
    Style,
    render_pairs,
    render_single,
)
from tta.world.shifts import DOMAINS, SHIFTS, Shift

__all__ = [
    "CAPTION_TEMPLATES",
    "CLASS_NAMES",
    "COLOUR_NAMES",
    "DOMAINS",
    "RELATIONS",
    "SHAPES",
    "SHIFTS",
    "Scenes",
    "Shift",
    "Style",
    "render_domain",
    "render_pairs",
    "render_single",
]


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown offline-world domain {domain!r}; choose from {list(DOMAINS)}")


def render_domain(domain: str, severity: int, n: int, seed: int, size: int = 64) -> Scenes:
    """``n`` single-object scenes of ``domain`` ("clean" or a shift name) at ``severity``."""
    check_domain(domain)
    if domain == "clean":
        return render_single(n, seed, size)
    shift = SHIFTS[domain]
    scenes = render_single(n, seed, size, style=shift.style(severity))
    # the pixel noise stream depends on the domain, not on which other domains were rendered
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(domain.encode()))
    scenes.images = shift.apply(scenes.images, severity, g)
    return scenes
