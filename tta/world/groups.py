"""Compositional groups of the offline world: 2 images x 2 captions that differ only by a swap.

A group starts from one two-object scene, "a red circle left of a blue square.", and a swap:

- ``relation``: the two objects trade places, "a blue square left of a red circle.";
- ``colour``: the two objects trade colours, "a blue circle left of a red square.";
- ``shape``: the two objects trade shapes, "a red square left of a blue circle.".

Both images are drawn from the same random state, so they share layout, sizes, rotations and
background and differ by the swap alone; image ``j`` realises caption ``j``. The two objects
always differ in colour *and* shape, so the three swaps give three different caption pairs and
each caption pair holds the same words (a bag-of-words model cannot tell them apart). Shifts
apply to both images as in :func:`tta.world.render_domain` (same style, same pixel noise stream
per domain).
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass

import torch

from tta.world.scenes import COLOUR_NAMES, REFERENCE_SIZE, RELATIONS, SHAPES, Style, draw_pairs, pair_caption
from tta.world.shifts import DOMAINS, SHIFTS

SWAP_KINDS: tuple[str, ...] = ("relation", "colour", "shape")


@dataclass
class Groups:
    """``n`` groups of ``k`` images and ``k`` captions; image ``j`` of a group realises caption ``j``."""

    images: torch.Tensor  # n x k x 3 x H x W float in [0, 1]
    captions: list[list[str]]  # n lists of k captions
    kinds: list[str]  # the swap of each group


def check_swap_kind(kind: str) -> None:
    if kind not in SWAP_KINDS:
        raise ValueError(f"unknown swap kind {kind!r}; choose from {list(SWAP_KINDS)}")


def _swapped(first: torch.Tensor, second: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The objects of the swapped scene (class index = shape * n_colours + colour)."""
    n_colours = len(COLOUR_NAMES)
    if kind == "relation":
        return second, first
    colour_a, shape_a = first % n_colours, first // n_colours
    colour_b, shape_b = second % n_colours, second // n_colours
    if kind == "colour":
        return shape_a * n_colours + colour_b, shape_b * n_colours + colour_a
    return shape_b * n_colours + colour_a, shape_a * n_colours + colour_b


def render_groups(
    kind: str, n: int, seed: int, domain: str = "clean", severity: int = 3, size: int = REFERENCE_SIZE
) -> Groups:
    """``n`` 2 x 2 groups of swap ``kind`` seen through ``domain`` ("clean" or a shift) at ``severity``.

    The same ``seed`` gives the same scenes in every domain, so domains differ by the shift alone.
    """
    check_swap_kind(kind)
    if domain not in DOMAINS:
        raise ValueError(f"unknown offline-world domain {domain!r}; choose from {list(DOMAINS)}")
    g = torch.Generator().manual_seed(seed * 7 + SWAP_KINDS.index(kind))
    n_colours = len(COLOUR_NAMES)
    colours = torch.stack([torch.randperm(n_colours, generator=g)[:2] for _ in range(n)])
    shapes = torch.stack([torch.randperm(len(SHAPES), generator=g)[:2] for _ in range(n)])
    first = shapes[:, 0] * n_colours + colours[:, 0]
    second = shapes[:, 1] * n_colours + colours[:, 1]
    relation = torch.randint(0, len(RELATIONS), (n,), generator=g)
    other_first, other_second = _swapped(first, second, kind)
    style = Style() if domain == "clean" else SHIFTS[domain].style(severity)
    layout = g.get_state()
    images = []
    for objects in ((first, second), (other_first, other_second)):
        g.set_state(layout)  # both images share layout, colours' jitter and background
        images.append(draw_pairs(*objects, relation, g, size, style).images)
    pixels = torch.stack(images, 1)  # n x 2 x 3 x H x W
    if domain != "clean":
        noise = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(f"groups-{domain}".encode()))
        shifted = SHIFTS[domain].apply(pixels.flatten(0, 1), severity, noise, scale=size / REFERENCE_SIZE)
        pixels = shifted.view_as(pixels)
    captions = [
        [pair_caption(a, r, b), pair_caption(c, r, d)]
        for a, b, c, d, r in zip(
            first.tolist(), second.tolist(), other_first.tolist(), other_second.tolist(), relation.tolist()
        )
    ]
    return Groups(pixels, captions, [kind] * n)
