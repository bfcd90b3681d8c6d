"""Seeded, vectorised procedural scenes: coloured shapes in cluttered, object-centric scenes.

Every scene is drawn from signed-distance functions evaluated on a pixel grid for the whole
batch at once, so a few thousand 64 x 64 images take well under a second on a CPU. The same
seed always gives the same images, captions and labels (all randomness comes from one
``torch.Generator``), and the same scene at any ``size``: geometry, colours and clutter are
drawn in units of the image side, so a scene rendered at 128 px and resized to 64 px matches
the scene rendered at 64 px up to resampling. Originals are rendered larger than the model
input (``ORIGINAL_SIZE``), as photographs are, and resized for the model.
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
#: Side in pixels of the world's model input. Shift levels and ``Style`` widths are given in
#: pixels of a scene this size; renderers scale them to the size they draw at.
REFERENCE_SIZE = 64
#: Side in pixels of the originals: the scene as "photographed", twice the model input, from
#: which the model input is resized and test-time views are cropped.
ORIGINAL_SIZE = 128
#: Bounding-box area of the main object of a single-object scene, as a fraction of the image,
#: drawn uniformly in this range (before the rotation changes the box: 15-60% after it).
OBJECT_BOX_FRACTION = (0.25, 0.48)
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

    outline_px: float | None = None  # draw only the outline, this many pixels wide at REFERENCE_SIZE
    texture_alpha: float = 0.0  # blend a random coloured texture into the background


@dataclass
class Scenes:
    """A batch of rendered scenes. ``labels`` is the class index of the first object."""

    images: torch.Tensor  # N x 3 x H x W float in [0, 1]
    labels: torch.Tensor  # N long
    captions: list[str]
    canonical: list[str]  # template-free caption: equal strings describe the same scene content
    boxes: torch.Tensor  # N x 4 float: x0, y0, x1, y1 (pixels, end exclusive) of the first object

    def originals(self) -> torch.Tensor:
        """The images as a decoded file holds them (uint8), as the datamodule stores them."""
        return (self.images * 255).round().to(torch.uint8)


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


def _paste_ellipses(
    images: torch.Tensor,
    cx: torch.Tensor,
    cy: torch.Tensor,
    rx: torch.Tensor,
    ry: torch.Tensor,
    angle: torch.Tensor,
    rgb: torch.Tensor,
) -> torch.Tensor:
    """``images`` (N x 3 x H x W) with K anti-aliased ellipses per image pasted on them (centres
    and half-axes in pixels, ``rgb`` N x K x 3). Each ellipse is evaluated in a window around it
    only, and the K of an image are composited as one layer (they rarely overlap)."""
    n, _, height, width = images.shape
    side = math.ceil(2 * float(torch.maximum(rx, ry).max())) + 3
    offsets = torch.arange(side, dtype=torch.float32)
    px = (cx - side / 2).floor()[..., None] + offsets  # N x K x side: pixel columns of the window
    py = (cy - side / 2).floor()[..., None] + offsets
    dx = (px + 0.5 - cx[..., None]).unsqueeze(-2)  # N x K x 1 x side
    dy = (py + 0.5 - cy[..., None]).unsqueeze(-1)  # N x K x side x 1
    cos, sin = torch.cos(angle)[..., None, None], torch.sin(angle)[..., None, None]
    a, b = (1 / rx**2)[..., None, None], (1 / ry**2)[..., None, None]
    # (u / rx)^2 + (v / ry)^2 for the rotated offsets u, v; the radial distance scaled by the
    # minor half-axis is close enough to a distance for anti-aliasing
    q = (a * cos**2 + b * sin**2) * dx**2 + (a * sin**2 + b * cos**2) * dy**2 + 2 * (a - b) * cos * sin * dx * dy
    alpha = (0.5 - (torch.sqrt(q) - 1) * torch.minimum(rx, ry)[..., None, None]).clamp(0.0, 1.0)
    inside = ((px >= 0) & (px < width)).unsqueeze(-2) & ((py >= 0) & (py < height)).unsqueeze(-1)
    alpha = alpha * inside
    flat = (
        torch.arange(n).view(n, 1, 1, 1) * (height * width)
        + py.clamp(0, height - 1).long().unsqueeze(-1) * width
        + px.clamp(0, width - 1).long().unsqueeze(-2)
    ).flatten()
    transparency = torch.zeros(n * height * width).index_add_(
        0, flat, torch.log1p(-alpha.clamp(max=1 - 1e-6)).flatten()
    )
    weight = torch.zeros(n * height * width).index_add_(0, flat, alpha.flatten())
    colour = torch.zeros(3, n * height * width)
    colour.index_add_(1, flat, (alpha.unsqueeze(-1) * rgb[:, :, None, None, :]).reshape(-1, 3).T)
    layer = (1 - transparency.exp()).view(n, 1, height, width)
    colour = (colour / weight.clamp(min=1e-6)).view(3, n, height, width).transpose(0, 1)
    return images * (1 - layer) + colour * layer


#: Clutter items per scene (each present with a per-scene probability): background context.
CLUTTER_ITEMS = 8


def _backgrounds(n: int, size: int, style: Style, g: torch.Generator) -> torch.Tensor:
    """Muted scenes: ground and sky split by a tilted horizon, a gentle lighting gradient, and up
    to ``CLUTTER_ITEMS`` small ellipses and sticks in muted colours (no class colour, no class
    shape); optionally a coloured texture blended in (the texture shift)."""
    coords = (torch.arange(size, dtype=torch.float32) + 0.5) / size
    x, y = coords.view(1, 1, 1, -1), coords.view(1, 1, -1, 1)
    sky = torch.rand(n, 1, 1, 1, generator=g) * 0.45 + 0.3 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.1
    ground = torch.rand(n, 1, 1, 1, generator=g) * 0.35 + 0.1 + (torch.rand(n, 3, 1, 1, generator=g) - 0.5) * 0.1
    horizon = (torch.rand(n, generator=g) * 0.5 + 0.25).view(-1, 1, 1, 1)
    tilt = ((torch.rand(n, generator=g) - 0.5) * 0.5).view(-1, 1, 1, 1)
    below = ((y - horizon - tilt * (x - 0.5)) * size + 0.5).clamp(0, 1)
    bg = sky * (1 - below) + ground * below
    direction = torch.rand(n, generator=g) * 2 * math.pi
    ramp = coords * 2 - 1
    gradient = (
        torch.cos(direction).view(-1, 1, 1) * ramp.view(1, 1, -1)
        + torch.sin(direction).view(-1, 1, 1) * ramp.view(1, -1, 1)
    ) * 0.06
    bg = bg + gradient.unsqueeze(1)

    k = CLUTTER_ITEMS
    present = torch.rand(n, k, generator=g) < torch.rand(n, 1, generator=g) * 0.7 + 0.2
    stick = torch.rand(n, k, generator=g) < 0.5
    centre = torch.rand(n, k, 2, generator=g) * size
    long_axis = (torch.rand(n, k, generator=g) * 0.07 + 0.03) * size
    aspect = torch.where(stick, torch.rand(n, k, generator=g) * 0.15 + 0.08, torch.rand(n, k, generator=g) * 0.4 + 0.4)
    angle = torch.rand(n, k, generator=g) * math.pi
    tone = torch.rand(n, k, 1, generator=g) * 0.6 + 0.15 + (torch.rand(n, k, 3, generator=g) - 0.5) * 0.12
    # an absent item is a point: nothing of it is drawn
    long_axis = torch.where(present, long_axis, 1e-3)
    bg = _paste_ellipses(bg, centre[..., 0], centre[..., 1], long_axis, long_axis * aspect, angle, tone)
    # drawn even when unused, so that a style change never shifts the rest of the random stream
    texture = _texture_params(n, g)
    if style.texture_alpha > 0:
        bg = (1 - style.texture_alpha) * bg + style.texture_alpha * _texture_pixels(
            texture, size, size / REFERENCE_SIZE
        )
    return bg.clamp(0, 1)


def _texture_params(n: int, g: torch.Generator) -> dict[str, torch.Tensor]:
    palette = torch.tensor(list(COLOURS.values()))
    pick = torch.randint(0, len(palette), (n, 2), generator=g)
    return {
        "c1": palette[pick[:, 0]].view(n, 3, 1, 1),
        "c2": palette[pick[:, 1]].view(n, 3, 1, 1),
        "freq": (torch.rand(n, generator=g) * 0.25 + 0.2).view(-1, 1, 1),
        "angle": (torch.rand(n, generator=g) * math.pi).view(-1, 1, 1),
        "phase": (torch.rand(n, generator=g) * 2 * math.pi).view(-1, 1, 1),
        "checker": (torch.rand(n, generator=g) < 0.5).view(-1, 1, 1),
    }


def _texture_pixels(params: dict[str, torch.Tensor], size: int, pixel_scale: float = 1.0) -> torch.Tensor:
    coords = torch.arange(size, dtype=torch.float32)
    y, x = torch.meshgrid(coords, coords, indexing="ij")
    freq, angle, phase = params["freq"] / pixel_scale, params["angle"], params["phase"]
    along = torch.cos(angle) * x + torch.sin(angle) * y
    across = -torch.sin(angle) * x + torch.cos(angle) * y
    stripes = torch.sin(freq * along + phase)
    checker = stripes * torch.sin(freq * across + phase)
    pattern = (torch.where(params["checker"], checker, stripes) > 0).float().unsqueeze(1)
    return pattern * params["c1"] + (1 - pattern) * params["c2"]


def _textures(n: int, size: int, g: torch.Generator, pixel_scale: float = 1.0) -> torch.Tensor:
    """Stripes and checkerboards in two palette colours: distracting, colour-bearing clutter.

    Stripe periods are 14-31 pixels times ``pixel_scale``."""
    return _texture_pixels(_texture_params(n, g), size, pixel_scale)


def _boxes(alpha: torch.Tensor) -> torch.Tensor:
    """N x 4 bounding boxes (x0, y0, x1, y1; pixels, end exclusive) of ``alpha`` > 0.5 (N x H x W)."""
    inside = alpha > 0.5
    index = torch.arange(alpha.shape[-1])

    def extent(any_along: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        first = torch.where(any_along, index, alpha.shape[-1]).amin(1)
        last = torch.where(any_along, index, -1).amax(1) + 1
        return first, last.clamp(min=first)

    x0, x1 = extent(inside.any(1))
    y0, y1 = extent(inside.any(2))
    return torch.stack([x0, y0, x1, y1], 1).float()


def _object_colours(colour: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    palette = torch.tensor(list(COLOURS.values()))
    n = colour.shape[0]
    jitter = (torch.rand(n, 3, generator=g) - 0.5) * 0.12
    brightness = torch.rand(n, 1, generator=g) * 0.15 + 0.85
    return ((palette[colour] + jitter) * brightness).clamp(0, 1)


#: Mean bounding-box area of each shape (in SHAPES order) over rotations, in units of radius^2.
_SHAPE_BOX_AREA = torch.tensor([3.61, 3.96, 2.70, 3.46, 3.83, 3.34])
#: Every shape lies within this many radii of its centre.
_SHAPE_REACH = 1.1


def render_single(n: int, seed: int, size: int = REFERENCE_SIZE, style: Style = Style()) -> Scenes:
    """``n`` object-centric scenes: one main object (the label) whose bounding box covers
    ``OBJECT_BOX_FRACTION`` of the image, near the centre, in front of background clutter."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, len(CLASS_NAMES), (n,), generator=g)
    shape, colour = labels // len(COLOUR_NAMES), labels % len(COLOUR_NAMES)
    low, high = OBJECT_BOX_FRACTION
    box_fraction = torch.rand(n, generator=g) * (high - low) + low
    radius = torch.sqrt(box_fraction / _SHAPE_BOX_AREA[shape])  # in image sides
    slack = (0.5 - _SHAPE_REACH * radius).clamp(0.0, 0.12)  # the object stays in the frame
    cx = 0.5 + (torch.rand(n, generator=g) * 2 - 1) * slack
    cy = 0.5 + (torch.rand(n, generator=g) * 2 - 1) * slack
    angle = torch.rand(n, generator=g) * 2 * math.pi
    rgb = _object_colours(colour, g).view(n, 3, 1, 1)
    template = torch.randint(0, len(CAPTION_TEMPLATES), (n,), generator=g)
    images = _backgrounds(n, size, style, g)
    outline = None if style.outline_px is None else style.outline_px * size / REFERENCE_SIZE
    alpha = _coverage(shape, cx * size, cy * size, radius * size, angle, size, outline)
    images = images * (1 - alpha.unsqueeze(1)) + rgb * alpha.unsqueeze(1)
    # the box of the silhouette, so that the sketch shift does not change it
    boxes = _boxes(
        alpha if outline is None else _coverage(shape, cx * size, cy * size, radius * size, angle, size, None)
    )
    names = [CLASS_NAMES[i] for i in labels.tolist()]
    captions = [CAPTION_TEMPLATES[t].format(name) for t, name in zip(template.tolist(), names)]
    canonical = [f"a {name}." for name in names]
    return Scenes(images, labels, captions, canonical, boxes)


def render_pairs(n: int, seed: int, size: int = REFERENCE_SIZE, style: Style = Style()) -> Scenes:
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
    size: int = REFERENCE_SIZE,
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
    outline = None if style.outline_px is None else style.outline_px * size / REFERENCE_SIZE
    for k, labels in enumerate((first, second)):
        rgb = _object_colours(labels % len(COLOUR_NAMES), g).view(n, 3, 1, 1)
        shape = labels // len(COLOUR_NAMES)
        alpha = _coverage(shape, cx[:, k], cy[:, k], radius[:, k], angle[:, k], size, outline)
        images = images * (1 - alpha.unsqueeze(1)) + rgb * alpha.unsqueeze(1)
        if k == 0:
            boxes = _boxes(_coverage(shape, cx[:, 0], cy[:, 0], radius[:, 0], angle[:, 0], size, None))
    canonical = [pair_caption(a, r, b) for a, r, b in zip(first.tolist(), relation.tolist(), second.tolist())]
    return Scenes(images, first, list(canonical), canonical, boxes)
