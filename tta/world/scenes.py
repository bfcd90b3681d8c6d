"""Seeded, vectorised procedural scenes: coloured shapes on plain or textured backgrounds.

Every scene is drawn from signed-distance functions evaluated on a pixel grid for the whole
batch at once, so a few thousand 64 x 64 images take well under a second on a CPU. The same
seed always gives the same images, captions and labels (all randomness comes from one
``torch.Generator``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star", "cross", "crescent")
COLOURS: dict[str, tuple[float, float, float]] = {
    "red": (0.86, 0.14, 0.14),
    "green": (0.13, 0.70, 0.22),
    "blue": (0.16, 0.32, 0.92),
    "yellow": (0.95, 0.84, 0.10),
    "purple": (0.62, 0.20, 0.80),
}
COLOUR_NAMES: tuple[str, ...] = tuple(COLOURS)
#: Class ``i`` is colour ``i % 5`` and shape ``i // 5``: "red circle", "green circle", ...
CLASS_NAMES: tuple[str, ...] = tuple(f"{c} {s}" for s in SHAPES for c in COLOUR_NAMES)
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
#: Caption templates used to train the tiny CLIP; ``{}`` is a class name.
CAPTION_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "a {}.",
    "a picture of a {}.",
    "an image of a {}.",
    "a small {}.",
    "a big {}.",
    "a rendering of a {}.",
)


@dataclass(frozen=True)
class Style:
    """How objects and backgrounds are drawn; shifts that act at render time change it."""

    outline_px: float | None = None  # draw only the outline, this many pixels wide
    texture_alpha: float = 0.0  # blend a random coloured texture into the background


@dataclass
class Scenes:
    """A batch of rendered scenes. ``labels`` is the class index of the first object."""

    images: torch.Tensor  # N x 3 x H x W float in [0, 1]
    labels: torch.Tensor  # N long
    captions: list[str]
    canonical: list[str]  # template-free caption: equal strings describe the same scene content


def _circle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.sqrt(u * u + v * v) - 0.95


def _square(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.maximum(u.abs(), v.abs()) - 0.78


_TRIANGLE_NORMALS = [(math.cos(a), math.sin(a)) for a in (math.pi / 2, 7 * math.pi / 6, 11 * math.pi / 6)]


def _triangle(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    # max of three half-planes: exact inside, close enough outside for outlines
    return torch.stack([-(u * nx + v * ny) for nx, ny in _TRIANGLE_NORMALS]).amax(0) - 0.5


def _star(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    spike = (((torch.atan2(v, u) * 5 / (2 * math.pi)) % 1.0) - 0.5).abs() * 2  # 1 at the tips
    return (torch.sqrt(u * u + v * v) - (0.42 + 0.58 * spike**1.5)) * 0.8


def _cross(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    arm = 0.34
    return torch.minimum(torch.maximum(u.abs() - 0.95, v.abs() - arm), torch.maximum(u.abs() - arm, v.abs() - 0.95))


def _crescent(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    bite = torch.sqrt((u - 0.5) ** 2 + v * v) - 0.75
    return torch.maximum(_circle(u, v), -bite)


_SDF = (_circle, _square, _triangle, _star, _cross, _crescent)  # in SHAPES order


def _shape_sdf(shape: torch.Tensor, u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Signed distance (object units, radius about 1) of each object's own shape.

    ``shape`` is N long; ``u, v`` are N x H x W local coordinates. Each shape's function runs
    only on the objects of that shape.
    """
    sdf = torch.empty_like(u)
    for k, fn in enumerate(_SDF):
        idx = (shape == k).nonzero().squeeze(1)
        if idx.numel():
            sdf[idx] = fn(u[idx], v[idx])
    return sdf


def _coverage(
    shape: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    radius: torch.Tensor,
    angle: torch.Tensor,
    size: int,
    outline_px: float | None,
) -> torch.Tensor:
    """Anti-aliased coverage (N x H x W in [0, 1]) of one object per image."""
    coords = torch.arange(size, dtype=torch.float32) + 0.5
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    dx = x.unsqueeze(0) - cx.view(-1, 1, 1)
    dy = y.unsqueeze(0) - cy.view(-1, 1, 1)
    cos, sin = torch.cos(angle).view(-1, 1, 1), torch.sin(angle).view(-1, 1, 1)
    r = radius.view(-1, 1, 1)
    u = (cos * dx + sin * dy) / r
    v = (-sin * dx + cos * dy) / r
    sdf_px = _shape_sdf(shape, u, v) * r
    if outline_px is not None:  # a band of this width just inside the silhouette
        sdf_px = torch.maximum(sdf_px, -(sdf_px + outline_px))
    return (0.5 - sdf_px).clamp(0.0, 1.0)


def _backgrounds(n: int, size: int, style: Style, g: torch.Generator) -> torch.Tensor:
    """Low-saturation grey backgrounds with a gentle gradient, optionally textured."""
    level = torch.rand(n, 1, 1, 1, generator=g) * 0.35 + 0.12
    tint = (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.08
    ramp = torch.linspace(-1, 1, size)
    direction = torch.rand(n, generator=g) * 2 * math.pi
    gradient = (
        torch.cos(direction).view(-1, 1, 1) * ramp.view(1, 1, -1)
        + torch.sin(direction).view(-1, 1, 1) * ramp.view(1, -1, 1)
    ) * 0.06
    bg = (level + tint + gradient.unsqueeze(1)).expand(n, 3, size, size).clone()
    # drawn even when unused, so that a style change never shifts the rest of the random stream
    texture = _textures(n, size, g)
    if style.texture_alpha > 0:
        bg = (1 - style.texture_alpha) * bg + style.texture_alpha * texture
    return bg.clamp(0, 1)


def _textures(n: int, size: int, g: torch.Generator) -> torch.Tensor:
    """Stripes and checkerboards in two palette colours: distracting, colour-bearing clutter."""
    palette = torch.tensor(list(COLOURS.values()))
    pick = torch.randint(0, len(palette), (n, 2), generator=g)
    c1, c2 = palette[pick[:, 0]].view(n, 3, 1, 1), palette[pick[:, 1]].view(n, 3, 1, 1)
    coords = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    freq = (torch.rand(n, generator=g) * 0.25 + 0.2).view(-1, 1, 1)
    angle = (torch.rand(n, generator=g) * math.pi).view(-1, 1, 1)
    phase = (torch.rand(n, generator=g) * 2 * math.pi).view(-1, 1, 1)
    along = torch.cos(angle) * x + torch.sin(angle) * y
    across = -torch.sin(angle) * x + torch.cos(angle) * y
    stripes = torch.sin(freq * along + phase)
    checker = torch.sin(freq * along + phase) * torch.sin(freq * across + phase)
    use_checker = (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1)
    pattern = (torch.where(use_checker, checker, stripes) > 0).float().unsqueeze(1)
    return pattern * c1 + (1 - pattern) * c2


def _object_colours(colour: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    palette = torch.tensor(list(COLOURS.values()))
    n = colour.shape[0]
    jitter = (torch.rand(n, 3, generator=g) - 0.5) * 0.12
    brightness = torch.rand(n, 1, generator=g) * 0.15 + 0.85
    return ((palette[colour] + jitter) * brightness).clamp(0, 1)


def render_single(n: int, seed: int, size: int = 64, style: Style = Style()) -> Scenes:
    """``n`` scenes of one object each; the label is the object's class index."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
    shape, colour = labels // len(COLOUR_NAMES), labels % len(COLOUR_NAMES)
    radius = (torch.rand(n, generator=g) * 0.16 + 0.16) * size
    cx = radius + torch.rand(n, generator=g) * (size - 2 * radius)
    cy = radius + torch.rand(n, generator=g) * (size - 2 * radius)
    angle = torch.rand(n, generator=g) * 2 * math.pi
    rgb = _object_colours(colour, g).view(n, 3, 1, 1)
    template = torch.randint(0, len(CAPTION_TEMPLATES), (n,), generator=g)
    images = _backgrounds(n, size, style, g)
    alpha = _coverage(shape, cx, cy, radius, angle, size, style.outline_px).unsqueeze(1)
    images = images * (1 - alpha) + rgb * alpha
    names = [CLASS_NAMES[i] for i in labels.tolist()]
    captions = [CAPTION_TEMPLATES[t].format(name) for t, name in zip(template.tolist(), names)]
    canonical = [f"a {name}." for name in names]
    return Scenes(images, labels, captions, canonical)


def render_pairs(n: int, seed: int, size: int = 64, style: Style = Style()) -> Scenes:
    """``n`` scenes of two different objects in a spatial relation.

    Captions read "a red circle left of a blue square."; the label is the first object's class.
    """
    g = torch.Generator().manual_seed(seed)
    first = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
    offset = torch.randint(1, len(CLASS_NAMES), (n,), generator=g)
    second = (first + offset) % len(CLASS_NAMES)  # always a different class
    relation = torch.randint(0, len(RELATIONS), (n,), generator=g)
    return draw_pairs(first, second, relation, g, size, style)


def pair_caption(first: int, relation: int, second: int) -> str:
    """The canonical caption of a two-object scene: "a red circle left of a blue square."."""
    return f"a {CLASS_NAMES[first]} {RELATIONS[relation]} a {CLASS_NAMES[second]}."


def draw_pairs(
    first: torch.Tensor,
    second: torch.Tensor,
    relation: torch.Tensor,
    g: torch.Generator,
    size: int = 64,
    style: Style = Style(),
) -> Scenes:
    """Two-object scenes of the given classes (``first``, ``second``: N class indices) and
    relations (N indices into ``RELATIONS``); layout, colours and background come from ``g``.

    Generators in the same state give the same layout and background for any objects, so two
    calls that differ only in the objects render minimal pairs (the compositional groups).
    """
    n = len(first)
    radius = (torch.rand(n, 2, generator=g) * 0.05 + 0.11) * size
    # the first object sits in one half, the second in the other, per the relation
    half = size / 2
    along = radius + torch.rand(n, 2, generator=g) * (half - 2 * radius)
    across = radius + torch.rand(n, 2, generator=g) * (size - 2 * radius)
    sign = torch.tensor([0.0, 1.0, 0.0, 1.0])[relation]  # 1: first object in the far half
    along_first = along[:, 0] + sign * half
    along_second = along[:, 1] + (1 - sign) * half
    horizontal = relation < 2
    cx = torch.stack(
        [torch.where(horizontal, along_first, across[:, 0]), torch.where(horizontal, along_second, across[:, 1])], 1
    )
    cy = torch.stack(
        [torch.where(horizontal, across[:, 0], along_first), torch.where(horizontal, across[:, 1], along_second)], 1
    )
    angle = torch.rand(n, 2, generator=g) * 2 * math.pi
    images = _backgrounds(n, size, style, g)
    for k, labels in enumerate((first, second)):
        rgb = _object_colours(labels % len(COLOUR_NAMES), g).view(n, 3, 1, 1)
        alpha = _coverage(
            labels // len(COLOUR_NAMES), cx[:, k], cy[:, k], radius[:, k], angle[:, k], size, style.outline_px
        ).unsqueeze(1)
        images = images * (1 - alpha) + rgb * alpha
    canonical = [pair_caption(a, r, b) for a, r, b in zip(first.tolist(), relation.tolist(), second.tolist())]
    return Scenes(images, first, list(canonical), canonical)
