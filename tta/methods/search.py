"""Search-TTA: a score map from a vision-language model, planners, and test-time adaptation
of the image tower from what a searcher finds.

An overhead image is split into a ``rows x cols`` grid of cells (cell ``i`` is row
``i // cols``, column ``i % cols``). Each cell gets an embedding (:class:`CellEncoder`): for an
open_clip ViT, as in the reference, one pass over the whole image and one patch token per cell
(the grid must be the ViT's token grid); for other towers (convolutional ones), the cell's crop
through the tower. Its score against the query (a text or an example image) is
``lambda_i = sigmoid(scale * cos_i + bias)``, with the reference's ``scale = 1 / 0.07`` and no
bias for CLIP-style models (a model with a logit bias, SigLIP, uses its own scale and bias).
The planner sees the map blurred (5 x 5 Gaussian, sigma 1.1, reflected borders: OpenCV's
``GaussianBlur(map, (5, 5), 0)`` of the reference) and min-max normalised. A searcher walks the
grid with 8-neighbour moves and a step budget; the sensor reads the number of targets in the
cell it stands on.

:class:`SearchTTASession` holds one episode: after a new find, or every ``update_every``
observed steps, it resets the image tower to its original weights, takes one fresh Adam step on
the whole observation history (one term per observed step, revisits included) with the
Poisson-process loss (:func:`poisson_loss`) weighted by region uncertainty
(:func:`negative_weights`, regions are a k-means of the cell embeddings made once per episode,
k chosen in 1-4 by :func:`choose_regions`), at a learning rate that ramps with the step count
over the number of grid cells, and recomputes the map. It works on a copy of the image tower:
the user's model is never changed. ``observe(cells, counts)`` is all a robot loop needs;
:func:`run_search` is the loop for simulated episodes.

Plain PyTorch (and scipy's k-means and extrema): no Lightning, no Hydra.
"""

from __future__ import annotations

import copy
import math
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from open_clip.transformer import VisionTransformer
from scipy.cluster.vq import kmeans2
from scipy.signal import argrelextrema

if TYPE_CHECKING:  # tta.models imports this module (the search runner)
    from tta.models.vlm import VisionLanguageModel

Cell = tuple[int, int]
#: The score map's scale for models without a logit bias: the reference's fixed 1 / 0.07.
REFERENCE_SCALE = 1 / 0.07
#: How cells get their embeddings: "tokens" (one ViT pass, a patch token per cell), "crops"
#: (each cell's crop through the tower), "auto" (tokens for an open_clip ViT, else crops).
CELL_MODES = ("auto", "tokens", "crops")
#: The 8-neighbour moves (row, column offsets), in the order ties are broken.
MOVES: tuple[Cell, ...] = ((-1, -1), (-1, 0), (-1, 1), (0, -1), (0, 1), (1, -1), (1, 0), (1, 1))


def check_grid(image: torch.Tensor, grid: Sequence[int]) -> tuple[int, int]:
    """``(rows, cols)``, or a clear error for an image that is not 3 x H x W or a grid that does not fit it."""
    if image.ndim != 3 or image.shape[0] != 3 or not image.is_floating_point():
        raise ValueError(
            f"the overhead image must be a float 3 x H x W tensor in [0, 1], got "
            f"{image.dtype} of shape {tuple(image.shape)}"
        )
    rows, cols = (int(g) for g in grid)
    if rows < 1 or cols < 1 or rows > image.shape[1] or cols > image.shape[2]:
        raise ValueError(
            f"grid {rows} x {cols} does not fit an image of {image.shape[1]} x {image.shape[2]} "
            "pixels: give at least one pixel per cell"
        )
    return rows, cols


def cell_crops(image: torch.Tensor, grid: Sequence[int], size: Sequence[int]) -> torch.Tensor:
    """The cells of ``image`` (3 x H x W) as ``rows * cols`` crops resized to ``size`` (row-major).

    Cell borders are ``round(k * H / rows)``, so an image that is not a multiple of the grid
    loses no pixels; cells are resized (bilinear, antialiased) only if they differ from ``size``.
    """
    rows, cols = check_grid(image, grid)
    ys = [round(k * image.shape[1] / rows) for k in range(rows + 1)]
    xs = [round(k * image.shape[2] / cols) for k in range(cols + 1)]
    crops = []
    for r in range(rows):
        for c in range(cols):
            crop = image[:, ys[r] : ys[r + 1], xs[c] : xs[c + 1]].unsqueeze(0)
            if tuple(crop.shape[-2:]) != tuple(size):
                crop = F.interpolate(crop, size=tuple(size), mode="bilinear", antialias=True, align_corners=False)
            crops.append(crop)
    return torch.cat(crops).clamp(0, 1)


def cell_scores(
    cell_features: torch.Tensor, query_features: torch.Tensor, scale: float | torch.Tensor, bias: float | torch.Tensor
) -> torch.Tensor:
    """``sigmoid(scale * cos + bias)`` of normalised cell features (N x D) against the query (D)."""
    return torch.sigmoid(scale * (cell_features @ query_features) + bias)


def encode_query(vlm: VisionLanguageModel, query: str | torch.Tensor) -> torch.Tensor:
    """Normalised query features (D): a text through the text tower, or an example image
    (3 x h x w in [0, 1], resized to the model's input) through the user's image tower."""
    if isinstance(query, str):
        if not query.strip():
            raise ValueError("the query text is empty: name what to search for, e.g. 'a red triangle.'")
        return vlm.encode_text(vlm.tokenize([query]))[0]
    if query.ndim != 3 or query.shape[0] != 3:
        raise ValueError(f"a query image must be 3 x h x w, got shape {tuple(query.shape)}")
    image = F.interpolate(
        query[None].float().to(vlm.device), size=vlm.image_size, mode="bilinear", antialias=True, align_corners=False
    ).clamp(0, 1)
    return vlm.encode_image(image)[0]


def map_calibration(
    vlm: VisionLanguageModel, cos: torch.Tensor, scale: float | None = None, bias: float | str | None = None
) -> tuple[float, float]:
    """``(scale, bias)`` of the score map ``sigmoid(scale * cos + bias)``.

    Defaults (None) follow the reference for CLIP-style models: ``scale = 1 / 0.07`` and no bias;
    a model with a logit bias (SigLIP) keeps its own scale and bias, its native sigmoid.
    ``bias="centred"`` is ``-scale * mean(cos)`` of the episode's cells (``cos``) under the
    original tower: it centres the zero-shot map, whose cosines are all positive for related
    images (an option, not the reference).
    """
    own_bias = vlm.logit_bias
    if scale is None:
        scale = float(vlm.logit_scale) if own_bias is not None else REFERENCE_SCALE
    scale = float(scale)
    if bias is None:
        bias = float(own_bias) if own_bias is not None else 0.0
    elif bias == "centred":
        bias = -scale * float(cos.mean())
    elif isinstance(bias, str):
        raise ValueError(f"bias must be a number, 'centred' or None (the reference), got {bias!r}")
    return scale, float(bias)


def token_grid(tower: torch.nn.Module) -> tuple[int, int] | None:
    """The patch-token grid ``(rows, cols)`` of an open_clip ViT image tower whose tokens project
    into the joint space (no attention pooling), else None."""
    if isinstance(tower, VisionTransformer) and tower.attn_pool is None and tower.proj is not None:
        return tuple(int(g) for g in tower.grid_size)
    return None


def vit_token_features(tower: VisionTransformer, pixels: torch.Tensor) -> torch.Tensor:
    """``B x T x D`` normalised patch-token embeddings of normalised ``pixels``: one pass of the
    tower, every token through the final layer norm and the projection the pooled token gets."""
    output_tokens = tower.output_tokens
    tower.output_tokens = True
    try:
        _, tokens = tower(pixels)
    finally:
        tower.output_tokens = output_tokens
    if tower.final_ln_after_pool:  # the pooled token is normed after pooling: norm the tokens too
        tokens = tower.ln_post(tokens)
    return F.normalize(tokens @ tower.proj, dim=-1)


class CellEncoder:
    """An episode's cells as embeddings through an image tower (the user's or an adapted copy).

    ``cells="tokens"``: the image resized to the model's input, one pass of an open_clip ViT,
    one patch token per cell (the reference's way; the grid must equal the ViT's token grid);
    ``"crops"``: each cell cropped (:func:`cell_crops`) and passed through the tower (for
    convolutional towers); ``"auto"``: tokens for an open_clip ViT, crops otherwise.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        image: torch.Tensor,
        grid: Sequence[int],
        cells: str = "auto",
        batch_size: int = 64,
    ) -> None:
        self.grid = check_grid(image, grid)
        if cells not in CELL_MODES:
            raise ValueError(f"cells must be one of {CELL_MODES}, got {cells!r}")
        tokens = token_grid(vlm.model.visual)
        self.mode = ("tokens" if tokens is not None else "crops") if cells == "auto" else cells
        if self.mode == "tokens":
            if tokens is None:
                raise ValueError(
                    f"cells='tokens' needs an open_clip ViT image tower; {vlm.name} has "
                    f"{type(vlm.model.visual).__name__}: use cells='crops'"
                )
            if self.grid != tokens:
                raise ValueError(
                    f"the episode's grid {self.grid} is not {vlm.name}'s patch-token grid {tokens}: one patch "
                    f"token scores one cell, so set the grid to {list(tokens)}, or use cells='crops'"
                )
            self.inputs = F.interpolate(
                image[None].to(vlm.device), size=vlm.image_size, mode="bilinear", antialias=True, align_corners=False
            ).clamp(0, 1)
        else:
            self.inputs = cell_crops(image.to(vlm.device), self.grid, vlm.image_size)
        self.normalize, self.batch_size = vlm.normalize, int(batch_size)

    def __call__(self, tower: torch.nn.Module, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised features (N x D) of the given flat cell indices (all cells if None)."""
        if self.mode == "tokens":
            features = vit_token_features(tower, self.normalize(self.inputs))[0]
            return features if cells is None else features[cells]
        crops = self.inputs if cells is None else self.inputs[cells]
        return torch.cat([F.normalize(tower(self.normalize(chunk)), dim=-1) for chunk in crops.split(self.batch_size)])


def zero_shot_scores(
    vlm: VisionLanguageModel,
    image: torch.Tensor,
    grid: Sequence[int],
    query: str | torch.Tensor,
    scale: float | None = None,
    bias: float | str | None = None,
    cell_batch_size: int = 64,
    cells: str = "auto",
) -> torch.Tensor:
    """The unadapted cell scores (rows * cols) of an episode: what :class:`SearchTTASession` starts from."""
    features = CellEncoder(vlm, image, grid, cells, cell_batch_size)(vlm.model.visual)
    query_features = encode_query(vlm, query)
    scale, bias = map_calibration(vlm, features @ query_features, scale, bias)
    return cell_scores(features, query_features, scale, bias)


def _reflected(n: int, pad: int) -> torch.Tensor:
    """Indices of ``-pad .. n - 1 + pad`` reflected into ``0 .. n - 1`` without repeating the edge
    (OpenCV's default border, torch's "reflect"), for any ``pad`` however small ``n``."""
    index = torch.arange(-pad, n + pad).abs()
    if n == 1:
        return torch.zeros_like(index)
    period = 2 * (n - 1)
    index = index % period
    return torch.where(index >= n, period - index, index)


def blur_map(values: torch.Tensor, size: int = 5, sigma: float = 1.1) -> torch.Tensor:
    """A ``rows x cols`` map blurred by a ``size x size`` Gaussian with reflected borders: OpenCV's
    ``GaussianBlur(values, (5, 5), 0)`` of the reference (sigma 0 means 1.1 for a 5-wide kernel)."""
    x = torch.arange(size, dtype=values.dtype, device=values.device) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    rows, cols = values.shape
    padded = values[_reflected(rows, size // 2)][:, _reflected(cols, size // 2)]
    return F.conv2d(padded[None, None], kernel[None, None])[0, 0]


def planner_map(scores: torch.Tensor, grid: Sequence[int], blur: bool = True) -> torch.Tensor:
    """What the planner sees: the ``rows x cols`` map of cell scores, blurred if ``blur``,
    min-max normalised to [0, 1] (all zeros for a flat map), on the CPU (the planners' home)."""
    values = scores.detach().float().cpu().view(*grid)
    if blur:
        values = blur_map(values)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def _kmeans(data: np.ndarray, k: int, seed: int) -> tuple[np.ndarray, float]:
    """Labels and inertia per sample (mean squared distance to the own cluster's mean) of a
    seeded k-means (k-means++ start, 50 Lloyd iterations)."""
    if k == 1:
        labels = np.zeros(len(data), dtype=np.int64)
    else:
        with warnings.catch_warnings():  # a cluster that empties is dropped, as k-means' empty clusters
            warnings.filterwarnings("ignore", message="One of the clusters is empty")
            _, labels = kmeans2(data, k, iter=50, minit="++", seed=np.random.default_rng(seed))
    centres = np.stack([data[labels == c].mean(0) for c in np.unique(labels)])
    inertia = float(((data - centres[np.searchsorted(np.unique(labels), labels)]) ** 2).sum() / len(data))
    return labels.astype(np.int64), inertia


def silhouette(data: np.ndarray, labels: np.ndarray) -> float:
    """Mean silhouette (Euclidean) of a labelling; a point alone in its cluster scores 0, and a
    labelling with one cluster scores -1 (it separates nothing)."""
    clusters = np.unique(labels)
    if len(clusters) < 2:
        return -1.0
    x = torch.from_numpy(data)
    distances = torch.cdist(x, x)
    onehot = torch.from_numpy(labels[:, None] == clusters[None, :]).double()
    sizes = onehot.sum(0)
    sums = distances @ onehot  # N x C: summed distance to each cluster
    own = torch.from_numpy(np.searchsorted(clusters, labels))
    own_size = sizes[own]
    a = sums.gather(1, own[:, None])[:, 0] / (own_size - 1).clamp(min=1)
    b = (sums / sizes).scatter(1, own[:, None], float("inf")).amin(1)
    s = torch.where(own_size > 1, (b - a) / torch.maximum(a, b).clamp(min=1e-12), torch.zeros_like(a))
    return float(s.mean())


def elbow(ks: Sequence[int], inertias: Sequence[float]) -> int | None:
    """The elbow of a decreasing convex inertia curve by the Kneedle rule (sensitivity 1, the
    first knee), as the reference finds it with ``kneed.KneeLocator``; None if there is none."""
    x, y = np.asarray(ks, dtype=float), np.asarray(inertias, dtype=float)
    if len(x) < 2 or np.ptp(y) == 0:
        return None
    x_norm = (x - x.min()) / np.ptp(x)
    y_norm = (y - y.min()) / np.ptp(y)
    difference = (y_norm.max() - y_norm) - x_norm  # the curve turned concave increasing
    maxima = argrelextrema(difference, np.greater_equal)[0]
    minima = argrelextrema(difference, np.less_equal)[0]
    if not maxima.size:
        return None
    thresholds = difference[maxima] - np.abs(np.diff(x_norm).mean())
    threshold, threshold_index, used, active = 0.0, int(maxima[0]), 0, True
    for i in range(int(maxima[0]), len(difference) - 1):
        if i in maxima:
            threshold, threshold_index, active = thresholds[used], i, True
            used += 1
        if i in minima:
            threshold, active = 0.0, False
        if active and difference[i + 1] < threshold:
            return int(x[threshold_index])
    return None


def choose_regions(
    cell_features: torch.Tensor,
    max_regions: int = 4,
    max_k: int = 8,
    silhouette_threshold: float = 0.15,
    relative_threshold: float = 0.15,
    seed: int = 0,
) -> torch.Tensor:
    """Region label (N long) of each cell: k-means of the cell features with k chosen per episode
    in ``1 .. max_regions``, as the reference chooses it.

    k = 1 unless two clusters cut the inertia by at least ``relative_threshold`` and reach a
    silhouette of ``silhouette_threshold``; otherwise k-means for k = 2 .. ``max_k`` gives the
    best-silhouette k and the inertia curve's elbow (None counts as 1); k is their value when they
    agree, else the ceiling of their mean, capped at ``max_regions``.
    """
    data = cell_features.detach().double().cpu().numpy()
    distinct = len(np.unique(data.round(8), axis=0))
    labels_1, inertia_1 = _kmeans(data, 1, seed)
    if distinct < 2 or max_k < 2 or inertia_1 == 0:
        return torch.as_tensor(labels_1)
    labels_2, inertia_2 = _kmeans(data, 2, seed)
    if (inertia_1 - inertia_2) / inertia_1 < relative_threshold or silhouette(data, labels_2) < silhouette_threshold:
        return torch.as_tensor(labels_1)
    fits = {2: (labels_2, inertia_2)} | {k: _kmeans(data, k, seed) for k in range(3, min(max_k, distinct) + 1)}
    ks = sorted(fits)
    silhouettes = [silhouette(data, fits[k][0]) for k in ks]
    by_silhouette = ks[int(np.argmax(silhouettes))]
    by_elbow = (elbow(ks, [fits[k][1] for k in ks]) or 1) if len(ks) > 1 else 2
    k = by_silhouette if by_silhouette == by_elbow else math.ceil((by_silhouette + by_elbow) / 2)
    k = max(1, min(k, max_regions))
    return torch.as_tensor(labels_1 if k == 1 else fits[k][0])


def kmeans_regions(cell_features: torch.Tensor, k: int, seed: int = 0) -> torch.Tensor:
    """Region label (N long) of each cell: a seeded k-means with a fixed ``k`` (capped at the number
    of distinct features), the option beside :func:`choose_regions`."""
    data = cell_features.detach().double().cpu().numpy()
    k = max(1, min(int(k), len(np.unique(data.round(8), axis=0))))
    return torch.as_tensor(_kmeans(data, k, seed)[0])


def negative_weights(regions: torch.Tensor, visited: torch.Tensor) -> torch.Tensor:
    """Uncertainty weight ``w-_i = min(1, (visited in region / (3 * region size))^2)`` of every cell.

    ``regions`` (N long) labels each cell's region, ``visited`` (N bool) marks the visited
    cells: a cell's "no target here" counts little while its region is still mostly unexplored.
    """
    n_regions = int(regions.max()) + 1
    size = torch.bincount(regions, minlength=n_regions).float()
    seen = torch.bincount(regions[visited], minlength=n_regions).float()
    return ((seen / (3 * size.clamp(min=1))) ** 2).clamp(max=1)[regions]


def poisson_loss(
    rates: torch.Tensor,
    counts: torch.Tensor,
    negative_weights: torch.Tensor,
    positive_weight: float = 4.0,
    eps: float = 1e-6,
) -> torch.Tensor:
    """``sum_i [w-_i * lambda_i - w+ * k_i * log(lambda_i + eps)]`` over the given (visited) cells:
    the negative log-likelihood of the observed counts ``k_i`` under Poisson rates ``lambda_i``,
    with the absence term weighted by region uncertainty and the finds by ``w+``."""
    counts = counts.to(rates.dtype)
    return (negative_weights * rates - positive_weight * counts * torch.log(rates + eps)).sum()


def ramp_lr(step: int, ramp_steps: int, lr_start: float = 1e-6, lr_end: float = 1e-5) -> float:
    """The reference's learning rate at ``step``: ``lr_start + (lr_end - lr_start) * step / ramp_steps``
    (``ramp_steps`` is the number of grid cells; a search longer than that goes past ``lr_end``)."""
    return lr_start + (lr_end - lr_start) * step / max(1, ramp_steps)


def _chebyshev_to_all(cell: Cell, rows: int, cols: int) -> torch.Tensor:
    r = torch.arange(rows).view(-1, 1)
    c = torch.arange(cols).view(1, -1)
    return torch.maximum((r - cell[0]).abs(), (c - cell[1]).abs())


def neighbours(cell: Cell, rows: int, cols: int) -> list[Cell]:
    """The in-grid 8-neighbours of ``cell``, in :data:`MOVES` order."""
    return [(cell[0] + dr, cell[1] + dc) for dr, dc in MOVES if 0 <= cell[0] + dr < rows and 0 <= cell[1] + dc < cols]


def greedy_step(position: Cell, value_map: torch.Tensor, visited: torch.Tensor, discount: float = 0.8) -> Cell:
    """Information-following: move to the neighbour ``n`` maximising
    ``V(n) = max over unvisited cells c of (map(c) + 1e-3) * discount ** chebyshev(n, c)``.

    The small constant makes every unvisited cell worth walking to once the map is flat; ties
    go to the first neighbour in :data:`MOVES` order. Moving to the best neighbour never
    oscillates: it strictly shortens the way to the cell that defines its value.
    """
    rows, cols = value_map.shape
    worth = torch.where(visited, torch.tensor(-1.0), value_map.float() + 1e-3)
    best, best_value = None, -math.inf
    for n in neighbours(position, rows, cols):
        value = float((worth * discount ** _chebyshev_to_all(n, rows, cols).float()).max())
        if value > best_value:
            best, best_value = n, value
    return best


def lawnmower_order(rows: int, cols: int) -> list[Cell]:
    """Boustrophedon sweep from the top-left corner: row 0 left to right, row 1 back, ..."""
    return [(r, c if r % 2 == 0 else cols - 1 - c) for r in range(rows) for c in range(cols)]


def lawnmower_step(position: Cell, value_map: torch.Tensor, visited: torch.Tensor) -> Cell:
    """The sweep baseline (ignores the map): one 8-neighbour step towards the first unvisited
    cell of :func:`lawnmower_order`."""
    rows, cols = value_map.shape
    goal = next((cell for cell in lawnmower_order(rows, cols) if not visited[cell]), position)
    sign = lambda d: (d > 0) - (d < 0)  # noqa: E731
    step = (position[0] + sign(goal[0] - position[0]), position[1] + sign(goal[1] - position[1]))
    return step if step != position else neighbours(position, rows, cols)[0]


PLANNERS: dict[str, Callable[[Cell, torch.Tensor, torch.Tensor], Cell]] = {
    "greedy": greedy_step,
    "lawnmower": lawnmower_step,
}


def check_planner(planner: str) -> None:
    if planner not in PLANNERS:
        raise ValueError(f"planner must be one of {list(PLANNERS)}, got {planner!r}")


@dataclass
class SearchResult:
    """One searched episode. ``found_steps`` holds the step at which each found target was found
    (step 0 is the start cell), in order."""

    n_targets: int
    found_steps: list[int]
    path: list[Cell]
    n_updates: int = 0
    update_ms: list[float] = field(default_factory=list)

    @property
    def found(self) -> int:
        return len(self.found_steps)

    @property
    def found_fraction(self) -> float | None:
        return self.found / self.n_targets if self.n_targets else None

    def steps_to(self, which: str) -> int | None:
        """Steps to the ``"first"``, ``"middle"`` (the ceil(n/2)-th) or ``"last"`` target; None if not reached."""
        rank = {"first": 1, "middle": math.ceil(self.n_targets / 2), "last": self.n_targets}[which]
        return self.found_steps[rank - 1] if 0 < rank <= self.found else None


def run_search(
    counts: torch.Tensor,
    value_map: torch.Tensor,
    budget: int,
    planner: str = "greedy",
    start: Cell = (0, 0),
    observe: Callable[[list[int], list[int]], torch.Tensor] | None = None,
    discount: float = 0.8,
) -> SearchResult:
    """Walk the grid for ``budget`` moves from ``start``; the sensor reads ``counts`` (rows x cols).

    ``observe(cells, counts)``, if given, is called after every step with the flat index of the
    cell stood on and its count, and returns the updated map (Search-TTA); without it the map
    stays ``value_map``. Targets in a cell are found on its first visit.
    """
    check_planner(planner)
    rows, cols = counts.shape
    if not (0 <= start[0] < rows and 0 <= start[1] < cols):
        raise ValueError(f"start {tuple(start)} is outside the {rows} x {cols} grid")
    if budget < 0:
        raise ValueError(f"budget is a number of moves, >= 0; got {budget}")
    visited = torch.zeros(rows, cols, dtype=torch.bool)
    position, found_steps, path = (int(start[0]), int(start[1])), [], []
    step_fn = partial(greedy_step, discount=discount) if planner == "greedy" else PLANNERS[planner]
    for step in range(budget + 1):
        path.append(position)
        count = int(counts[position])
        if not visited[position]:
            found_steps += [step] * count
        visited[position] = True
        if observe is not None:
            value_map = observe([position[0] * cols + position[1]], [count])
        if step < budget:
            position = step_fn(position, value_map, visited)
    return SearchResult(n_targets=int(counts.sum()), found_steps=found_steps, path=path)


class SearchTTASession:
    """One episode of Search-TTA: the score map and its adaptation from observations.

    Args:
        vlm: the vision-language model; its image tower is copied (the model is never changed).
        image: the overhead image, float 3 x H x W in [0, 1].
        grid: ``(rows, cols)``.
        query: a text ("a red triangle.") or an example image (3 x h x w in [0, 1]).
        lr_start, lr_end: the Adam learning rate ramps from ``lr_start`` by ``(lr_end - lr_start)
            * step / lr_ramp_steps`` (the reference's ramp).
        lr_ramp_steps: None: the number of grid cells (the reference); a number of steps otherwise.
        update_every: update after this many observed steps without one (besides every new find).
        positive_weight: ``w+`` of the loss.
        n_regions: None: k of the k-means regions chosen in 1-4 per episode
            (:func:`choose_regions`, the reference); a number fixes k.
        scale, bias: of ``sigmoid(scale * cos + bias)``; None: the reference's ``1 / 0.07`` and no
            bias (a model with a logit bias: its own); ``bias="centred"``: ``-scale * mean cos``
            of this episode's cells under the original tower (see :func:`map_calibration`).
        blur: blur the planner's map (5 x 5, sigma 1.1, reflected borders).
        seed: the k-means seed.
        cell_batch_size: cell crops per image-tower call (speed only).
        cells: "auto", "tokens" or "crops" (see :class:`CellEncoder`).

    ``observe(cells, counts)`` records the sensor's counts at flat cell indices
    (``row * cols + col``), one observed step per cell, updates the model when due, and returns the
    planner's map (rows x cols, in [0, 1]). The history keeps one entry per step, revisits
    included, with the targets newly found at that step (a cell's targets are found on its first
    visit; a revisit adds a "nothing new here" term), as the reference's trajectory does.
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        image: torch.Tensor,
        grid: Sequence[int],
        query: str | torch.Tensor,
        lr_start: float = 1e-6,
        lr_end: float = 1e-5,
        lr_ramp_steps: int | None = None,
        update_every: int = 20,
        positive_weight: float = 4.0,
        n_regions: int | None = None,
        scale: float | None = None,
        bias: float | str | None = None,
        blur: bool = True,
        seed: int = 0,
        cell_batch_size: int = 64,
        cells: str = "auto",
    ) -> None:
        if lr_start <= 0 or lr_end <= 0:
            raise ValueError(f"lr_start and lr_end must be > 0, got {lr_start}, {lr_end}")
        if update_every < 1 or (n_regions is not None and n_regions < 1):
            raise ValueError(f"update_every and n_regions (or None) must be >= 1, got {update_every}, {n_regions}")
        if lr_ramp_steps is not None and lr_ramp_steps < 1:
            raise ValueError(f"lr_ramp_steps must be >= 1 or None (the number of grid cells), got {lr_ramp_steps}")
        self.encoder = CellEncoder(vlm, image, grid, cells, cell_batch_size)
        self.grid, self.vlm, self.blur = self.encoder.grid, vlm, blur
        self.n_cells = self.grid[0] * self.grid[1]
        self.lr_start, self.lr_end = lr_start, lr_end
        self.lr_ramp_steps = self.n_cells if lr_ramp_steps is None else int(lr_ramp_steps)
        self.update_every, self.positive_weight = update_every, positive_weight
        self.tower = copy.deepcopy(vlm.model.visual).eval().requires_grad_(True)
        self.original_state = {k: v.detach().clone() for k, v in self.tower.state_dict().items()}
        with torch.no_grad():
            self.query_features = encode_query(vlm, query)
            features = self.encoder(self.tower)
        self.scale, self.bias = map_calibration(vlm, features @ self.query_features, scale, bias)
        regions = (
            choose_regions(features, seed=seed) if n_regions is None else kmeans_regions(features, n_regions, seed)
        )
        self.regions = regions.to(vlm.device)
        self.scores = cell_scores(features, self.query_features, self.scale, self.bias)
        self.initial_scores = self.scores.clone()
        self.history: list[tuple[int, int]] = []  # (cell, targets newly found there), one per step
        self.visited: set[int] = set()
        self.steps = 0
        self._last_update_step = 0
        self.update_ms: list[float] = []

    @property
    def map(self) -> torch.Tensor:
        """The planner's map: rows x cols in [0, 1]."""
        return planner_map(self.scores, self.grid, self.blur)

    def observe(self, cells: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        cells, counts = [int(c) for c in cells], [int(k) for k in counts]
        if len(cells) != len(counts):
            raise ValueError(f"observe got {len(cells)} cells but {len(counts)} counts: give one count per cell")
        bad = [c for c in cells if not 0 <= c < self.n_cells]
        if bad or any(k < 0 for k in counts):
            raise ValueError(
                f"cells must be flat indices row * cols + col in [0, {self.n_cells}) and counts >= 0; "
                f"got cells {bad or cells}, counts {counts}"
            )
        new_find = False
        for cell, count in zip(cells, counts):
            found = 0 if cell in self.visited else count
            new_find = new_find or found > 0
            self.history.append((cell, found))
            self.visited.add(cell)
        self.steps += len(cells)
        if new_find or self.steps - self._last_update_step >= self.update_every:
            self.update()
        return self.map

    def reset_tower(self) -> None:
        """Back to the original weights (every update starts from them)."""
        self.tower.load_state_dict(self.original_state)
        self.tower.zero_grad(set_to_none=True)

    def learning_rate(self) -> float:
        """The ramp at the latest observed step (the first observed step is step 0, as the reference's)."""
        return ramp_lr(self.steps - 1, self.lr_ramp_steps, self.lr_start, self.lr_end)

    def update(self) -> None:
        """Reset, one Adam step on the whole history (one term per step), recompute the map."""
        start = time.perf_counter()
        self._last_update_step = self.steps
        self.reset_tower()
        device = self.regions.device
        cells = torch.tensor([c for c, _ in self.history], dtype=torch.long, device=device)
        counts = torch.tensor([k for _, k in self.history], dtype=torch.float32, device=device)
        visited = torch.zeros(self.n_cells, dtype=torch.bool, device=device)
        visited[cells] = True
        weights = negative_weights(self.regions, visited)[cells]
        optimizer = torch.optim.Adam(self.tower.parameters(), lr=self.learning_rate())
        rates = cell_scores(self.encoder(self.tower, cells), self.query_features, self.scale, self.bias)
        poisson_loss(rates, counts, weights, self.positive_weight).backward()
        optimizer.step()
        with torch.no_grad():
            self.scores = cell_scores(self.encoder(self.tower), self.query_features, self.scale, self.bias)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        self.update_ms.append((time.perf_counter() - start) * 1000)


def search_with_tta(
    session: SearchTTASession,
    counts: torch.Tensor,
    budget: int,
    planner: str = "greedy",
    start: Cell = (0, 0),
    discount: float = 0.8,
) -> SearchResult:
    """A simulated episode driven through ``session.observe``: the planner walks the adapted map."""
    result = run_search(counts, session.map, budget, planner, start, observe=session.observe, discount=discount)
    result.n_updates, result.update_ms = len(session.update_ms), list(session.update_ms)
    return result
