"""Search episodes of the offline world: a large overhead image, a query, hidden targets.

An episode is a ``rows x cols`` grid of square cells of ``cell_px`` pixels. The terrain is a
Voronoi partition of the image into regions of a few *region types* (each its own colour and
texture); targets are shapes of one class of the world ("a red triangle."), scattered by a
Poisson process whose rate depends on the region type: one type, drawn per episode, is dense,
the others sparse. The query names the class (or shows a clean example image of it); the
vision-language model knows what the class looks like, not where it lives, so a searcher can
only learn the "where" from its own finds.

The zero-shot map is imperfect by construction: targets are small (a third of a cell or less
across), drawn semi-transparent and partly hidden under terrain-coloured canopy blobs (blobs
also lie where nothing is), and distractors of other classes, some sharing the query's colour
or shape, are scattered evenly. A domain shift of the world (see :mod:`tta.world.shifts`)
then applies to the whole overhead image, at render time (sketch outlines, texture clutter) or
on the pixels (noise, blur, contrast, hue), as for the single-object scenes.

Each object lies fully inside one cell, so a cell's target count is exact. Every random draw
comes from one ``torch.Generator`` seeded from the episode seed, so the same seed gives the
same episode, and the shifted domains show the clean episode changed by the shift alone.
"""

from __future__ import annotations

import math
import zlib
from dataclasses import dataclass

import torch

from tta.world.scenes import CLASS_NAMES, COLOUR_NAMES, Style, _coverage, _object_colours, _textures
from tta.world.shifts import DOMAINS, SHIFTS

#: Region types of the terrain: a muted base colour and a texture kind each.
REGION_TYPES: tuple[str, ...] = ("meadow", "sand", "rock")
_REGION_COLOURS = torch.tensor([[0.33, 0.38, 0.29], [0.47, 0.44, 0.38], [0.36, 0.36, 0.38]])


@dataclass(frozen=True)
class SearchWorld:
    """How search episodes are drawn (defaults: the shipped benchmark's world).

    ``dense_rate``/``sparse_rate``: expected targets per cell in the episode's dense region
    type and in the others; ``distractor_rate``: expected distractor objects per cell
    anywhere; ``canopy_rate``: expected canopy blobs per cell besides those over objects.
    Object radii are a fraction of ``cell_px`` (the world's training scenes have 0.16-0.32).
    """

    rows: int = 16
    cols: int = 16
    cell_px: int = 64
    n_sites: int = 9
    dense_rate: float = 0.35
    sparse_rate: float = 0.02
    distractor_rate: float = 0.25
    canopy_rate: float = 0.3
    radius: tuple[float, float] = (0.15, 0.22)
    target_alpha: tuple[float, float] = (0.6, 0.9)

    def __post_init__(self) -> None:
        if self.rows < 2 or self.cols < 2 or self.cell_px < 16:
            raise ValueError(
                f"the grid needs at least 2 x 2 cells of 16 px or more, got {self.rows} x {self.cols} "
                f"cells of {self.cell_px} px"
            )
        if min(self.dense_rate, self.sparse_rate, self.distractor_rate, self.canopy_rate) < 0:
            raise ValueError("rates are expected objects per cell and cannot be negative")
        if self.n_sites < len(REGION_TYPES):
            raise ValueError(f"n_sites must be >= {len(REGION_TYPES)} (one region per type at least)")


@dataclass
class SearchEpisode:
    """One search episode; ``counts`` is the ground truth the searcher's sensor reads."""

    image: torch.Tensor  # 3 x (rows * cell_px) x (cols * cell_px), float in [0, 1]
    query: str  # "a red triangle."
    query_image: torch.Tensor  # 3 x cell_px x cell_px: a clean example of the target class
    target_class: int  # index into CLASS_NAMES
    counts: torch.Tensor  # rows x cols long: targets per cell (hidden from the planner)
    targets: torch.Tensor  # N x 2 float: target centres in pixels, (x, y)
    regions: torch.Tensor  # rows x cols long: region type of each cell (for analysis only)
    dense_type: int  # the region type where targets are dense
    domain: str


def _terrain(world: SearchWorld, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Terrain pixels (3 x H x W) and the region type of every pixel (H x W)."""
    h, w = world.rows * world.cell_px, world.cols * world.cell_px
    sites = torch.rand(world.n_sites, 2, generator=g) * torch.tensor([w, h])
    # every type appears at least once, the rest of the sites draw their type at random
    types = torch.cat(
        [
            torch.randperm(len(REGION_TYPES), generator=g),
            torch.randint(0, len(REGION_TYPES), (world.n_sites - len(REGION_TYPES),), generator=g),
        ]
    )
    ys, xs = torch.meshgrid(
        torch.arange(h, dtype=torch.float32) + 0.5, torch.arange(w, dtype=torch.float32) + 0.5, indexing="ij"
    )
    # a gently warped distance makes region borders wavy rather than straight
    warp = 0.06 * min(h, w) * torch.sin(ys / (0.11 * h) + torch.rand(1, generator=g) * 6.28)
    d = (xs.unsqueeze(0) + warp - sites[:, 0].view(-1, 1, 1)) ** 2 + (ys.unsqueeze(0) - sites[:, 1].view(-1, 1, 1)) ** 2
    region = types[d.argmin(0)]
    base = (_REGION_COLOURS + (torch.rand(len(REGION_TYPES), 3, generator=g) - 0.5) * 0.06).clamp(0, 1)
    # one texture per type: meadow speckle, sand ripples, rock blotches
    speckle = torch.rand(1, h, w, generator=g) - 0.5
    ripples = torch.sin(xs * 0.35 + 0.6 * torch.sin(ys * 0.05)).unsqueeze(0)
    coarse = torch.nn.functional.interpolate(
        torch.rand(1, 1, h // 16 + 1, w // 16 + 1, generator=g) - 0.5, size=(h, w), mode="bilinear", align_corners=False
    )[0]
    pattern = torch.cat([0.12 * speckle, 0.05 * ripples, 0.18 * coarse])  # type x H x W
    pixels = base[region].permute(2, 0, 1) + pattern.gather(0, region.unsqueeze(0))
    return pixels.clamp(0, 1), region


def _objects_in_cells(rate_per_cell: torch.Tensor, world: SearchWorld, g: torch.Generator) -> tuple[torch.Tensor, ...]:
    """Poisson counts per cell, and for every object its cell and its centre/radius in the cell."""
    counts = torch.poisson(rate_per_cell, generator=g).long()
    cells = torch.repeat_interleave(torch.arange(counts.numel()), counts.flatten())
    n = len(cells)
    radius = (world.radius[0] + torch.rand(n, generator=g) * (world.radius[1] - world.radius[0])) * world.cell_px
    cx = radius + torch.rand(n, generator=g) * (world.cell_px - 2 * radius)
    cy = radius + torch.rand(n, generator=g) * (world.cell_px - 2 * radius)
    return counts, cells, cx, cy, radius


def _paste(
    image: torch.Tensor, cells: torch.Tensor, alpha: torch.Tensor, rgb: torch.Tensor, world: SearchWorld
) -> None:
    """Blend per-object layers (alpha N x s x s, rgb N x 3 [x s x s]) into their cells, in order."""
    s = world.cell_px
    for k, cell in enumerate(cells.tolist()):
        r, c = divmod(cell, world.cols)
        patch = image[:, r * s : (r + 1) * s, c * s : (c + 1) * s]
        colour = rgb[k] if rgb[k].ndim == 3 else rgb[k].view(3, 1, 1)
        patch.mul_(1 - alpha[k]).add_(colour * alpha[k])


def render_query_image(target_class: int, size: int, g: torch.Generator) -> torch.Tensor:
    """A clean example of ``target_class``: one centred object on a grey background (3 x size x size)."""
    shape = torch.tensor([target_class // len(COLOUR_NAMES)])
    colour = _object_colours(torch.tensor([target_class % len(COLOUR_NAMES)]), g).view(3, 1, 1)
    angle = torch.rand(1, generator=g) * 2 * math.pi
    alpha = _coverage(
        shape, torch.tensor([size / 2]), torch.tensor([size / 2]), torch.tensor([0.3 * size]), angle, size, None
    )
    return torch.full((3, size, size), 0.3) * (1 - alpha) + colour * alpha


def render_search_episode(
    seed: int, domain: str = "clean", severity: int = 3, world: SearchWorld = SearchWorld()
) -> SearchEpisode:
    """The episode of ``seed`` seen in ``domain`` ("clean" or a shift of the world) at ``severity``."""
    if domain not in DOMAINS:
        raise ValueError(f"unknown offline-world domain {domain!r}; choose from {list(DOMAINS)}")
    shift = SHIFTS.get(domain)
    style = shift.style(severity) if shift is not None else Style()
    g = torch.Generator().manual_seed(seed)
    s = world.cell_px
    target_class = int(torch.randint(0, len(CLASS_NAMES), (1,), generator=g))
    image, pixel_region = _terrain(world, g)
    regions = pixel_region[s // 2 :: s, s // 2 :: s]  # the type at each cell's centre
    dense_type = int(torch.randint(0, len(REGION_TYPES), (1,), generator=g))
    rate = torch.where(regions == dense_type, world.dense_rate, world.sparse_rate)

    counts, t_cells, t_cx, t_cy, t_radius = _objects_in_cells(rate, world, g)
    _, d_cells, d_cx, d_cy, d_radius = _objects_in_cells(torch.full_like(rate, world.distractor_rate), world, g)
    n_t, n_d = len(t_cells), len(d_cells)
    # distractors: any other class; half of them share the query's colour or its shape
    other = torch.randint(1, len(CLASS_NAMES), (n_d,), generator=g)
    d_class = (target_class + other) % len(CLASS_NAMES)
    near = torch.rand(n_d, generator=g) < 0.5
    same_colour = torch.rand(n_d, generator=g) < 0.5
    n_colours, n_shapes = len(COLOUR_NAMES), len(CLASS_NAMES) // len(COLOUR_NAMES)
    t_shape, t_colour = target_class // n_colours, target_class % n_colours
    alt_shape = (t_shape + torch.randint(1, n_shapes, (n_d,), generator=g)) % n_shapes
    alt_colour = (t_colour + torch.randint(1, n_colours, (n_d,), generator=g)) % n_colours
    d_class = torch.where(near & same_colour, alt_shape * n_colours + t_colour, d_class)
    d_class = torch.where(near & ~same_colour, t_shape * n_colours + alt_colour, d_class)

    classes = torch.cat([torch.full((n_t,), target_class), d_class])
    cells = torch.cat([t_cells, d_cells])
    cx, cy, radius = torch.cat([t_cx, d_cx]), torch.cat([t_cy, d_cy]), torch.cat([t_radius, d_radius])
    n = n_t + n_d
    angle = torch.rand(n, generator=g) * 2 * math.pi
    rgb = _object_colours(classes % n_colours, g)
    opacity = world.target_alpha[0] + torch.rand(n, generator=g) * (world.target_alpha[1] - world.target_alpha[0])
    order = torch.randperm(n, generator=g)  # objects sharing a cell overlap in random order
    alpha = _coverage(classes // n_colours, cx, cy, radius, angle, s, style.outline_px) * opacity.view(-1, 1, 1)

    # canopy blobs: one over the edge of every object, and more anywhere
    c_counts = torch.poisson(torch.full_like(rate, world.canopy_rate), generator=g).long()
    free = torch.repeat_interleave(torch.arange(c_counts.numel()), c_counts.flatten())
    direction = torch.rand(n, generator=g) * 2 * math.pi
    offset = radius * (0.7 + 0.5 * torch.rand(n, generator=g))
    m = len(free)
    blob_radius = torch.cat(
        [radius * (0.55 + 0.3 * torch.rand(n, generator=g)), (0.08 + 0.1 * torch.rand(m, generator=g)) * s]
    )
    blob_cx = torch.cat([cx + offset * torch.cos(direction), s * torch.rand(m, generator=g)])
    blob_cy = torch.cat([cy + offset * torch.sin(direction), s * torch.rand(m, generator=g)])
    blob_cells = torch.cat([cells, free])
    blob_alpha = (
        _coverage(torch.zeros(n + m, dtype=torch.long), blob_cx, blob_cy, blob_radius, torch.zeros(n + m), s, None)
        * 0.9
    )
    # a blob takes the darkened terrain colour under its centre
    px = (blob_cells % world.cols) * s + blob_cx.clamp(0, s - 1).long()
    py = (blob_cells // world.cols) * s + blob_cy.clamp(0, s - 1).long()
    blob_rgb = (image[:, py, px].T * 0.75).clamp(0, 1)

    # drawn even when unused, so that a style change never shifts the rest of the random stream
    clutter = _textures(1, max(image.shape[-2:]), g)[0, :, : image.shape[-2], : image.shape[-1]]
    if style.texture_alpha > 0:  # the texture shift clutters the terrain, as the scenes' backgrounds
        image = (1 - style.texture_alpha) * image + style.texture_alpha * clutter
    _paste(image, cells[order], alpha[order], rgb[order], world)
    _paste(image, blob_cells, blob_alpha, blob_rgb, world)

    if shift is not None:  # the pixel stream depends on the seed and the domain only
        pixel_g = torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(domain.encode()))
        image = shift.apply(image.unsqueeze(0), severity, pixel_g)[0]
    targets = torch.stack([(t_cells % world.cols) * s + t_cx, (t_cells // world.cols) * s + t_cy], 1)
    query_image = render_query_image(target_class, s, g)
    return SearchEpisode(
        image=image.clamp(0, 1),
        query=f"a {CLASS_NAMES[target_class]}.",
        query_image=query_image,
        target_class=target_class,
        counts=counts.view(world.rows, world.cols),
        targets=targets,
        regions=regions,
        dense_type=dense_type,
        domain=domain,
    )
