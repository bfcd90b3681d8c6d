"""Search-TTA: a score map from a vision-language model, planners, and test-time adaptation
of the image tower from what a searcher finds.

An overhead image is split into a ``rows x cols`` grid of cells (cell ``i`` is row
``i // cols``, column ``i % cols``). Each cell is scored against the query (a text or an
example image) by its crop through the image tower: ``lambda_i = sigmoid(scale * cos_i + bias)``.
The planner sees the map blurred (5 x 5 Gaussian, optional) and min-max normalised. A searcher
walks the grid with 8-neighbour moves and a step budget; the sensor reads the number of
targets in the cell it stands on.

:class:`SearchTTASession` holds one episode: after a new find, or every ``update_every``
observed steps, it resets the image tower to its original weights, takes one fresh Adam step on
the whole observation history with the Poisson-process loss (:func:`poisson_loss`) weighted by
region uncertainty (:func:`negative_weights`, regions are a k-means of the cell embeddings made
once per episode), at a learning rate that ramps with the step count, and recomputes the map.
It works on a copy of the image tower: the user's model is never changed. ``observe(cells,
counts)`` is all a robot loop needs; :func:`run_search` is the loop for simulated episodes.

Plain PyTorch (and scipy's k-means): no Lightning, no Hydra.
"""

from __future__ import annotations

import copy
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING

import numpy as np
import torch
import torch.nn.functional as F
from scipy.cluster.vq import kmeans2

if TYPE_CHECKING:  # tta.models imports this module (the search runner)
    from tta.models.vlm import VisionLanguageModel

Cell = tuple[int, int]
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
    vlm: VisionLanguageModel, cos: torch.Tensor, scale: float | None = None, bias: float | None = None
) -> tuple[float, float]:
    """``(scale, bias)`` of the score map: given values, else the model's logit scale, and its
    logit bias if it has one, else ``-scale * mean(cos)`` of the episode's cells under the
    original tower, which centres the zero-shot map (CLIP cosines of related images are all
    positive, and ``sigmoid(scale * cos)`` alone would sit at 1 with no gradient)."""
    scale = float(vlm.logit_scale) if scale is None else float(scale)
    if bias is None:
        bias = float(vlm.logit_bias) if vlm.logit_bias is not None else -scale * float(cos.mean())
    return scale, float(bias)


def zero_shot_scores(
    vlm: VisionLanguageModel,
    image: torch.Tensor,
    grid: Sequence[int],
    query: str | torch.Tensor,
    scale: float | None = None,
    bias: float | None = None,
    cell_batch_size: int = 64,
) -> torch.Tensor:
    """The unadapted cell scores (rows * cols) of an episode: what :class:`SearchTTASession` starts from."""
    crops = cell_crops(image.to(vlm.device), grid, vlm.image_size)
    features = vlm.encode_image(crops, batch_size=cell_batch_size)
    query_features = encode_query(vlm, query)
    scale, bias = map_calibration(vlm, features @ query_features, scale, bias)
    return cell_scores(features, query_features, scale, bias)


def blur_map(values: torch.Tensor, size: int = 5, sigma: float = 1.0) -> torch.Tensor:
    """A ``rows x cols`` map blurred by a ``size x size`` Gaussian (edges replicated)."""
    x = torch.arange(size, dtype=values.dtype, device=values.device) - (size - 1) / 2
    kernel = torch.exp(-(x**2) / (2 * sigma**2))
    kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
    padded = F.pad(values[None, None], (size // 2,) * 4, mode="replicate")
    return F.conv2d(padded, kernel[None, None])[0, 0]


def planner_map(scores: torch.Tensor, grid: Sequence[int], blur: bool = True) -> torch.Tensor:
    """What the planner sees: the ``rows x cols`` map of cell scores, blurred if ``blur``,
    min-max normalised to [0, 1] (all zeros for a flat map), on the CPU (the planners' home)."""
    values = scores.detach().float().cpu().view(*grid)
    if blur:
        values = blur_map(values)
    span = values.max() - values.min()
    return (values - values.min()) / span if span > 0 else torch.zeros_like(values)


def kmeans_regions(cell_features: torch.Tensor, k: int = 4, seed: int = 0) -> torch.Tensor:
    """Region label (N long) of each cell: k-means (k-means++ start, seeded) of the cell features.

    ``k`` is capped at the number of distinct features; empty clusters are allowed (k <= 4 in the
    reference)."""
    data = cell_features.detach().double().cpu().numpy()
    k = max(1, min(k, len(np.unique(data.round(8), axis=0))))
    _, labels = kmeans2(data, k, minit="++", seed=np.random.default_rng(seed))
    return torch.as_tensor(labels, dtype=torch.long)


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


def ramp_lr(step: int, total_steps: int, lr_start: float = 1e-6, lr_end: float = 1e-5) -> float:
    """The learning rate at ``step`` of ``total_steps``: linear from ``lr_start`` to ``lr_end``."""
    progress = min(1.0, max(0.0, step / max(1, total_steps)))
    return lr_start + (lr_end - lr_start) * progress


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
        total_steps: the steps over which the learning rate ramps (the planner's budget).
        lr_start, lr_end: the ramp of the Adam learning rate with the step count.
        update_every: update after this many observed steps without one (besides every new find).
        positive_weight: ``w+`` of the loss.
        n_regions: k of the k-means regions of the uncertainty weights.
        scale, bias: of ``sigmoid(scale * cos + bias)``; ``None``: the model's logit scale, and
            its logit bias if it has one, else ``-scale * mean cos`` of this episode's cells under
            the original tower, which centres the zero-shot map (CLIP cosines are all positive and
            would saturate the sigmoid).
        blur: blur the planner's map 5 x 5.
        seed: the k-means seed.
        cell_batch_size: cells per image-tower call (speed only).

    ``observe(cells, counts)`` records the counts read at flat cell indices (``row * cols + col``),
    counts each observed cell as one step, updates the model when due, and returns the planner's
    map (rows x cols, in [0, 1]).
    """

    def __init__(
        self,
        vlm: VisionLanguageModel,
        image: torch.Tensor,
        grid: Sequence[int],
        query: str | torch.Tensor,
        total_steps: int,
        lr_start: float = 1e-6,
        lr_end: float = 1e-5,
        update_every: int = 20,
        positive_weight: float = 4.0,
        n_regions: int = 4,
        scale: float | None = None,
        bias: float | None = None,
        blur: bool = True,
        seed: int = 0,
        cell_batch_size: int = 64,
    ) -> None:
        if lr_start <= 0 or lr_end <= 0:
            raise ValueError(f"lr_start and lr_end must be > 0, got {lr_start}, {lr_end}")
        if update_every < 1 or n_regions < 1 or total_steps < 1:
            raise ValueError(
                f"update_every, n_regions and total_steps must be >= 1, got {update_every}, {n_regions}, {total_steps}"
            )
        self.grid = check_grid(image, grid)
        self.vlm, self.blur = vlm, blur
        self.total_steps, self.lr_start, self.lr_end = total_steps, lr_start, lr_end
        self.update_every, self.positive_weight, self.cell_batch_size = update_every, positive_weight, cell_batch_size
        device = vlm.device
        self.tower = copy.deepcopy(vlm.model.visual).eval().requires_grad_(True)
        self.original_state = {k: v.detach().clone() for k, v in self.tower.state_dict().items()}
        self.crops = cell_crops(image.to(device), self.grid, vlm.image_size)
        with torch.no_grad():
            self.query_features = encode_query(vlm, query)
            features = self.encode_cells()
        self.scale, self.bias = map_calibration(vlm, features @ self.query_features, scale, bias)
        self.regions = kmeans_regions(features, n_regions, seed).to(device)
        self.scores = cell_scores(features, self.query_features, self.scale, self.bias)
        self.initial_scores = self.scores.clone()
        self.history: dict[int, int] = {}
        self.steps = 0
        self._last_update_step = 0
        self.update_ms: list[float] = []

    def encode_cells(self, cells: torch.Tensor | None = None) -> torch.Tensor:
        """Normalised features of the given cells (all if None) through the working tower."""
        crops = self.crops if cells is None else self.crops[cells]
        return torch.cat(
            [F.normalize(self.tower(self.vlm.normalize(chunk)), dim=-1) for chunk in crops.split(self.cell_batch_size)]
        )

    @property
    def map(self) -> torch.Tensor:
        """The planner's map: rows x cols in [0, 1]."""
        return planner_map(self.scores, self.grid, self.blur)

    def observe(self, cells: Sequence[int], counts: Sequence[int]) -> torch.Tensor:
        cells, counts = [int(c) for c in cells], [int(k) for k in counts]
        n_cells = self.grid[0] * self.grid[1]
        if len(cells) != len(counts):
            raise ValueError(f"observe got {len(cells)} cells but {len(counts)} counts: give one count per cell")
        bad = [c for c in cells if not 0 <= c < n_cells]
        if bad or any(k < 0 for k in counts):
            raise ValueError(
                f"cells must be flat indices row * cols + col in [0, {n_cells}) and counts >= 0; "
                f"got cells {bad or cells}, counts {counts}"
            )
        new_find = any(k > 0 and c not in self.history for c, k in zip(cells, counts))
        self.history.update(zip(cells, counts))
        self.steps += len(cells)
        if new_find or self.steps - self._last_update_step >= self.update_every:
            self.update()
        return self.map

    def reset_tower(self) -> None:
        """Back to the original weights (every update starts from them)."""
        self.tower.load_state_dict(self.original_state)
        self.tower.zero_grad(set_to_none=True)

    def update(self) -> None:
        """Reset, one Adam step on the whole history, recompute the map."""
        start = time.perf_counter()
        self._last_update_step = self.steps
        self.reset_tower()
        device = self.crops.device
        cells = torch.tensor(list(self.history), dtype=torch.long, device=device)
        counts = torch.tensor(list(self.history.values()), dtype=torch.float32, device=device)
        visited = torch.zeros(len(self.crops), dtype=torch.bool, device=device)
        visited[cells] = True
        weights = negative_weights(self.regions, visited)[cells]
        optimizer = torch.optim.Adam(
            self.tower.parameters(), lr=ramp_lr(self.steps, self.total_steps, self.lr_start, self.lr_end)
        )
        rates = cell_scores(self.encode_cells(cells), self.query_features, self.scale, self.bias)
        poisson_loss(rates, counts, weights, self.positive_weight).backward()
        optimizer.step()
        with torch.no_grad():
            self.scores = cell_scores(self.encode_cells(), self.query_features, self.scale, self.bias)
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
