"""Search-TTA as a callback: each episode searched again with the map adapted from its finds."""

from __future__ import annotations

import time
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.callbacks.base import sample_seed, seed_in_force
from tta.methods.search import SearchTTASession, search_with_tta
from tta.tasks.search_runner import SearchEpisodeRunner, episode_outputs, episode_query
from tta.validation import check_number


class SearchTTA(pl.Callback):
    """Search-TTA (defaults as in the reference; see :mod:`tta.methods.search`).

    For every episode of the batch, the runner's planner walks the grid while a
    :class:`~tta.methods.search.SearchTTASession` adapts a copy of the image tower: on each new
    find or every ``update_every`` steps it resets the tower to its original weights, takes one
    Adam step on the observation history (one term per step; learning rate ramping from
    ``lr_start`` by ``(lr_end - lr_start) * step / lr_ramp_steps``, None: the number of grid
    cells, as the reference), and recomputes the map. ``n_regions``: None chooses k of the
    region k-means in 1-4 per episode (the reference), a number fixes it. The map's scale, bias,
    blur and cell mode are the runner's. The episode results replace the runner's
    (``found``, ``steps_*``), which stay as ``found_zs``, ``steps_*_zs``; ``adapt_ms`` (B) holds
    each episode's adaptation wall time, ``n_updates`` (B) and ``ms_per_update`` (B) the updates.

    ``seed`` seeds each episode's k-means regions with the episode index; None takes the seed of
    ``pytorch_lightning.seed_everything`` (0 if it was not called).
    """

    method_name = "search_tta"

    def __init__(
        self,
        lr_start: float = 1e-6,
        lr_end: float = 1e-5,
        update_every: int = 20,
        positive_weight: float = 4.0,
        n_regions: int | None = None,
        lr_ramp_steps: int | None = None,
        seed: int | None = None,
    ) -> None:
        super().__init__()
        check_number("lr_start", lr_start, 0, low_open=True)
        check_number("lr_end", lr_end, 0, low_open=True)
        check_number("update_every", update_every, 1, integer=True)  # steps
        check_number("n_regions", n_regions, 1, integer=True, optional=True)  # None: chosen per episode
        check_number("lr_ramp_steps", lr_ramp_steps, 1, integer=True, optional=True)  # None: the grid's cells
        check_number("positive_weight", positive_weight, 0, low_open=True)  # w+
        check_number("seed", seed, integer=True, optional=True)
        self.lr_start, self.lr_end, self.update_every = lr_start, lr_end, update_every
        self.positive_weight, self.n_regions, self.seed = positive_weight, n_regions, seed
        self.lr_ramp_steps = lr_ramp_steps
        self._run_seed = 0

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not isinstance(pl_module, SearchEpisodeRunner):
            raise TypeError(
                f"SearchTTA adapts search episodes: use tta.tasks.SearchEpisodeRunner (got {type(pl_module).__name__})"
            )
        self._run_seed = self.seed if self.seed is not None else seed_in_force() or 0

    def session(self, runner: SearchEpisodeRunner, batch: dict[str, Any], k: int) -> SearchTTASession:
        """Episode ``k``'s session (build it under ``inference_mode(False)``)."""
        return SearchTTASession(
            runner.vlm,
            batch["image"][k].clone(),
            tuple(int(g) for g in batch["grid"][k]),
            episode_query(batch, k),
            lr_start=self.lr_start,
            lr_end=self.lr_end,
            lr_ramp_steps=self.lr_ramp_steps,
            update_every=self.update_every,
            positive_weight=self.positive_weight,
            n_regions=self.n_regions,
            scale=runner.scale,
            bias=runner.bias,
            blur=runner.blur,
            seed=sample_seed(self._run_seed, int(batch["index"][k])),
            cell_batch_size=runner.cell_batch_size,
            cells=runner.cells,
        )

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: dict[str, Any],
        batch: dict[str, Any],
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        results, adapt_ms = [], []
        for k in range(len(batch["index"])):
            start = time.perf_counter()
            with torch.inference_mode(False), torch.enable_grad():
                session = self.session(pl_module, batch, k)
                results.append(
                    search_with_tta(
                        session,
                        batch["counts"][k].cpu(),
                        pl_module.budget,
                        pl_module.planner,
                        tuple(int(s) for s in batch["start"][k]),
                        pl_module.discount,
                    )
                )
            adapt_ms.append((time.perf_counter() - start) * 1000)
        for key, value in episode_outputs(results).items():
            if key != "n_targets":
                outputs.setdefault(f"{key}_zs", outputs[key])
            outputs[key] = value
        outputs["adapt_ms"] = torch.tensor(adapt_ms)
        outputs["n_updates"] = torch.tensor([r.n_updates for r in results])
        outputs["ms_per_update"] = torch.tensor([sum(r.update_ms) / max(1, r.n_updates) for r in results])
