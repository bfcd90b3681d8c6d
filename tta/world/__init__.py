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
    ORIGINAL_SIZE,
    REFERENCE_SIZE,
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
    "ORIGINAL_SIZE",
    "REFERENCE_SIZE",
    "RELATIONS",
    "SHAPES",
    "SHIFTS",
    "Scenes",
    "Shift",
    "Style",
    "render_domain",
    "render_pairs",
    "render_shifted",
    "render_single",
]


def check_domain(domain: str) -> None:
    if domain not in DOMAINS:
        raise ValueError(f"unknown offline-world domain {domain!r}; choose from {list(DOMAINS)}")


def render_domain(domain: str, severity: int, n: int, seed: int, size: int = REFERENCE_SIZE) -> Scenes:
    """``n`` single-object scenes of ``domain`` ("clean" or a shift name) at ``severity``,
    ``size`` pixels on a side (``ORIGINAL_SIZE`` for the originals that are resized for the model)."""
    check_domain(domain)
    if domain == "clean":
        return render_single(n, seed, size)
    return render_shifted(domain, SHIFTS[domain], severity, n, seed, size)


def render_shifted(name: str, shift: Shift, severity: int, n: int, seed: int, size: int = REFERENCE_SIZE) -> Scenes:
    """:func:`render_domain` for a shift given by its object (a trial severity table, say)
    under the domain ``name``, which seeds its pixel noise."""
    scenes = render_single(n, seed, size, style=shift.style(severity))
    # the pixel noise stream depends on the domain, not on which other domains were rendered
    g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
    scenes.images = shift.apply(scenes.images, severity, g, scale=size / REFERENCE_SIZE)
    return scenes
