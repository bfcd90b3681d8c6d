"""Search episodes as datamodules: the offline world's, and a reader for a user's own.

The episode batch contract (one batch item is one episode; the default batch size is 1):

- ``image``: list of B float tensors ``3 x H x W`` in [0, 1], RGB, not normalised: the
  overhead images (sizes may differ between episodes);
- ``grid``: long tensor ``B x 2``, ``(rows, cols)`` of each episode's grid of cells;
- ``query``: list of B query texts (None where the episode's query is an image);
- ``query_image``: list of B float tensors ``3 x h x w`` in [0, 1] (None where the query is a text);
- ``counts``: list of B long tensors ``rows x cols``, the targets in each cell: hidden from the
  planner, read only by the simulated sensor;
- ``start``: long tensor ``B x 2``, the cell ``(row, col)`` the searcher starts in;
- ``index``: long tensor ``B``, the episode's index in the datamodule (unique across domains);
- ``domain``: list of B strings.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import UnidentifiedImageError
from torch.utils.data import Dataset
from torchvision.transforms.v2 import functional as TF
from typing_extensions import override

from tta.datamodules.preprocess import INTERPOLATIONS, UnsupportedImageError, decode
from tta.datamodules.streams import StreamDataModule
from tta.validation import check_number
from tta.world import CLASS_NAMES, DOMAINS, check_domain
from tta.world.search import SearchWorld, render_search_episode

LIST_KEYS = ("image", "query", "query_image", "counts", "domain")
STACK_KEYS = ("grid", "start", "index")


def collate_episodes(items: list[dict[str, Any]]) -> dict[str, Any]:
    """Episodes of any size into one batch: per-episode lists, small fields stacked."""
    batch = {key: [item[key] for item in items] for key in LIST_KEYS}
    batch.update({key: torch.stack([torch.as_tensor(item[key]) for item in items]) for key in STACK_KEYS})
    return batch


class WorldEpisodes(Dataset):
    """Episodes of the offline world, rendered on access (about 0.7 s each at 16 x 16 cells of 64 px)."""

    def __init__(self, seeds: list[int], domains: list[str], severity: int, world: SearchWorld, query: str) -> None:
        self.seeds, self.domains, self.severity, self.world, self.query = seeds, domains, severity, world, query

    def __len__(self) -> int:
        return len(self.seeds)

    def __getitem__(self, i: int) -> dict[str, Any]:
        episode = render_search_episode(self.seeds[i], self.domains[i], self.severity, self.world)
        text = self.query == "text"
        return {
            "image": episode.image,
            "query": episode.query if text else None,
            "query_image": None if text else episode.query_image,
            "counts": episode.counts,
            "grid": (self.world.rows, self.world.cols),
            "start": (0, 0),
            "index": i,
            "domain": episode.domain,
        }


class WorldSearchDataModule(StreamDataModule):
    """Search episodes of the offline world (see :mod:`tta.world.search`), ``n_episodes`` per domain.

    Every domain shows the same episodes (seeds ``seed, seed + 1, ...``) through its shift. Cells
    are ``image_size`` pixels (the model's input size by default, so crops need no resizing);
    the searcher starts in the top-left cell. ``query``: "text" ("a red triangle.") or "image"
    (a clean example of the target class). ``world`` overrides :class:`SearchWorld` fields
    (rates, grid, radii).
    """

    name = "world_search"
    class_names = list(CLASS_NAMES)  # the classes a query can name
    #: ``grid`` is kept in ``world`` (its rows and cols), which the run key records whole.
    argument_attributes = {"grid": None}

    def __init__(
        self,
        domains: Sequence[str] | str = "clean",
        severity: int = 3,
        n_episodes: int = 50,
        seed: int = 20_000,
        image_size: int = 64,
        grid: Sequence[int] = (16, 16),
        query: str = "text",
        world: dict[str, Any] | None = None,
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        self.domains = list(DOMAINS) if domains == "all" else [domains] if isinstance(domains, str) else list(domains)
        if not self.domains or len(set(self.domains)) != len(self.domains):
            raise ValueError(f"domains must list each domain once, from {list(DOMAINS)}; got {self.domains}")
        for domain in self.domains:
            check_domain(domain)
        check_number("severity", severity, 1, 5, integer=True)
        check_number("n_episodes", n_episodes, 1, integer=True)
        check_number("seed", seed, integer=True)
        check_number("image_size", image_size, 1, integer=True)
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("num_workers", num_workers, 0, integer=True)
        if query not in ("text", "image"):
            raise ValueError(f"query must be 'text' or 'image', got {query!r}")
        rows, cols = (int(g) for g in grid)
        self.world = SearchWorld(rows=rows, cols=cols, cell_px=int(image_size), **dict(world or {}))
        self.severity, self.n_episodes, self.seed, self.query = int(severity), int(n_episodes), int(seed), query
        self.image_size, self.batch_size, self.num_workers = int(image_size), int(batch_size), int(num_workers)
        self.dataset: WorldEpisodes | None = None

    @override
    def setup(self, stage: str) -> None:
        seeds = [self.seed + k for k in range(self.n_episodes)] * len(self.domains)
        domains = [d for d in self.domains for _ in range(self.n_episodes)]
        self.dataset = WorldEpisodes(seeds, domains, self.severity, self.world, self.query)
        self.order = torch.arange(len(seeds))

    @override
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_episodes


def _load_rgb(path: Path) -> torch.Tensor:
    """The image as float RGB in [0, 1]; a broken or refused file is one ValueError that names it."""
    try:
        return decode(path).float() / 255
    except UnsupportedImageError:  # names the file, its mode and the fix already
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as error:  # Pillow's, for a broken file
        raise ValueError(f"cannot decode the image {path} ({error}): replace the file") from error


class EpisodeFolderDataModule(StreamDataModule):
    """A user's own search episodes: ``root/episodes.json`` and the images it names.

    ``episodes.json`` is a list of episodes, each::

        {"image": "area1.png",                 # the overhead image, relative to root
         "query": "a red car.",                 # or "query_image": "car.png"
         "targets": [[x, y], ...],              # target centres in pixels of the image
         "grid": [rows, cols],
         "start": [row, col],                   # optional, default [0, 0]
         "domain": "site A"}                    # optional, default "user"

    The file and every image are checked when the datamodule is built. ``image_size``, if
    given, resizes each image so that its cells are ``image_size`` pixels (targets follow), with
    the model's ``interpolation`` (antialiased); None keeps the images as they are (the model
    resizes the cells).
    """

    name = "episode_folder"

    def __init__(
        self,
        root: str | Path,
        image_size: int | None = None,
        interpolation: str = "bicubic",
        batch_size: int = 1,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if interpolation not in INTERPOLATIONS:
            raise ValueError(
                f"unknown interpolation {interpolation!r}: set data.interpolation to one of {list(INTERPOLATIONS)}"
            )
        check_number("image_size", image_size, 1, integer=True, optional=True)
        check_number("batch_size", batch_size, 1, integer=True)
        check_number("num_workers", num_workers, 0, integer=True)
        self.root = Path(root).expanduser()
        self.image_size, self.batch_size, self.num_workers = image_size, int(batch_size), int(num_workers)
        self.interpolation = interpolation
        self.episodes = self._read_index()
        self.class_names = sorted({e.get("query") or Path(e["query_image"]).stem for e in self.episodes})
        self.domains = list(dict.fromkeys(e.get("domain", "user") for e in self.episodes))
        self.dataset: list[dict[str, Any]] | None = None

    def _read_index(self) -> list[dict[str, Any]]:
        index = self.root / "episodes.json"
        if not index.is_file():
            raise FileNotFoundError(
                f"no episodes.json in {self.root}: the folder needs an episodes.json listing "
                "image, query (or query_image), targets and grid of each episode"
            )
        try:
            episodes = json.loads(index.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{index} is not valid JSON: {error}") from error
        if not isinstance(episodes, list) or not episodes:
            raise ValueError(f"{index} must hold a non-empty list of episodes")
        for k, episode in enumerate(episodes):
            where = f"{index}, episode {k}"
            missing = {"image", "targets", "grid"} - set(episode)
            if missing or ("query" in episode) == ("query_image" in episode):
                raise ValueError(
                    f"{where}: needs image, targets, grid and exactly one of query / query_image; "
                    f"missing {sorted(missing)}"
                )
            for key in ("image", "query_image"):
                if key in episode and not (self.root / episode[key]).is_file():
                    raise FileNotFoundError(f"{where}: {key} {episode[key]!r} is not a file under {self.root}")
            grid = episode["grid"]
            if len(grid) != 2 or min(int(g) for g in grid) < 1:
                raise ValueError(f"{where}: grid must be [rows, cols] of positive integers, got {grid}")
        return episodes

    def _episode(self, k: int, episode: dict[str, Any]) -> dict[str, Any]:
        image = _load_rgb(self.root / episode["image"])
        rows, cols = (int(g) for g in episode["grid"])
        height, width = image.shape[1:]
        targets = torch.tensor(episode["targets"], dtype=torch.float32).view(-1, 2)
        outside = ((targets < 0) | (targets >= torch.tensor([width, height]))).any(1)
        if outside.any():
            raise ValueError(
                f"episode {k} ({episode['image']}): targets {targets[outside].tolist()} lie outside "
                f"the {width} x {height} image: coordinates are [x, y] pixels of the image"
            )
        row = (targets[:, 1] * rows / height).long()
        col = (targets[:, 0] * cols / width).long()
        counts = torch.bincount(row * cols + col, minlength=rows * cols).view(rows, cols)
        if self.image_size is not None:
            size = [rows * self.image_size, cols * self.image_size]
            image = TF.resize(image, size, interpolation=INTERPOLATIONS[self.interpolation], antialias=True).clamp(0, 1)
        start = tuple(int(s) for s in episode.get("start", (0, 0)))
        if not (0 <= start[0] < rows and 0 <= start[1] < cols):
            raise ValueError(f"episode {k}: start {list(start)} is outside its {rows} x {cols} grid")
        query_image = _load_rgb(self.root / episode["query_image"]) if "query_image" in episode else None
        return {
            "image": image,
            "query": episode.get("query"),
            "query_image": query_image,
            "counts": counts,
            "grid": (rows, cols),
            "start": start,
            "index": k,
            "domain": episode.get("domain", "user"),
        }

    @override
    def setup(self, stage: str) -> None:
        if self.dataset is None:
            self.dataset = [self._episode(k, e) for k, e in enumerate(self.episodes)]
            self.order = torch.arange(len(self.dataset))

    @override
    def input_files(self) -> list[Path]:
        named = [self.root / e[key] for e in self.episodes for key in ("image", "query_image") if key in e]
        return list(dict.fromkeys([self.root / "episodes.json", *named]))

    @override
    def collate_fn(self) -> Callable[[list[dict[str, Any]]], dict[str, Any]]:
        return collate_episodes
