"""Search episodes as a LightningModule: the planner on the unadapted map, one row per episode."""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from typing import Any

import pytorch_lightning as pl
import torch
from typing_extensions import override

from tta.methods.search import CELL_MODES, SearchResult, check_planner, planner_map, run_search, zero_shot_scores
from tta.models.vlm import VisionLanguageModel
from tta.tasks.base import OverVLM

#: Per-episode outputs of :func:`episode_outputs`, besides index and domain.
RESULT_KEYS = ("n_targets", "found", "steps_first", "steps_middle", "steps_last")
MILESTONES = ("first", "middle", "last")
#: The per-domain metrics (the CLI's table shows these columns); the overall ones are all of
#: :func:`summarize_search`.
DOMAIN_METRICS = ("n", "found_fraction", "found_fraction_zs", "steps_first")


def episode_outputs(results: Sequence[SearchResult]) -> dict[str, torch.Tensor]:
    """Per-episode result tensors (B long); a step count is -1 where that target was not reached."""
    out = {"n_targets": torch.tensor([r.n_targets for r in results]), "found": torch.tensor([r.found for r in results])}
    for which in MILESTONES:
        steps = [r.steps_to(which) for r in results]
        out[f"steps_{which}"] = torch.tensor([-1 if s is None else s for s in steps])
    return out


def check_episode_batch(batch: dict[str, Any]) -> None:
    """Clear errors for a batch that breaks the episode contract (see ``tta.datamodules.search``)."""
    missing = {"image", "grid", "query", "query_image", "counts", "start", "index", "domain"} - set(batch)
    if missing:
        raise KeyError(
            f"batch lacks {sorted(missing)}: search episodes come from a search datamodule "
            "(tta.datamodules.WorldSearchDataModule or EpisodeFolderDataModule)"
        )
    for k, (text, image) in enumerate(zip(batch["query"], batch["query_image"])):
        if (text is None) == (image is None):
            raise ValueError(f"episode {int(batch['index'][k])} needs exactly one query: a text or an image")


def episode_query(batch: dict[str, Any], k: int) -> str | torch.Tensor:
    return batch["query"][k] if batch["query"][k] is not None else batch["query_image"][k]


class SearchEpisodeRunner(OverVLM, pl.LightningModule):
    """Runs each episode's searcher on the zero-shot score map of a vision-language model.

    Args:
        vlm: the model that scores cells against the query.
        planner: "greedy" (information-following over the map) or "lawnmower" (a sweep that
            ignores the map).
        budget: moves per episode (the start cell is observed before the first move).
        blur: blur the planner's map (5 x 5, sigma 1.1, reflected borders).
        discount: of the greedy planner's look-ahead value.
        scale, bias: of the map's ``sigmoid(scale * cos + bias)`` (None: the reference's
            ``1 / 0.07`` and no bias, or the model's own for a model with a logit bias;
            ``bias="centred"``: see :func:`tta.methods.search.map_calibration`).
        cell_batch_size: cell crops per image-tower call (speed only).
        cells: "auto" (patch tokens of an open_clip ViT, one pass per map, as the reference; cell
            crops through other towers), "tokens" or "crops" (see :class:`tta.methods.search.CellEncoder`).

    ``predict_step`` returns ``index``, ``domain`` and per episode (B long tensors) ``n_targets``,
    ``found`` and ``steps_first``/``steps_middle``/``steps_last`` (the step at which the first,
    the ceil(n/2)-th and the last target was found; -1 if not within the budget). The
    :class:`~tta.callbacks.SearchTTA` callback replaces them with the adapted search's and
    keeps these as ``*_zs``.
    """

    prediction_columns: tuple[str, ...] = (
        "index",
        "domain",
        "n_targets",
        "found",
        "found_fraction",
        "steps_first",
        "steps_middle",
        "steps_last",
        "found_zs",
        "found_fraction_zs",
        "steps_first_zs",
        "steps_middle_zs",
        "steps_last_zs",
        "n_updates",
        "ms_per_update",
    )

    def __init__(
        self,
        vlm: VisionLanguageModel,
        planner: str = "greedy",
        budget: int = 64,
        blur: bool = True,
        discount: float = 0.8,
        scale: float | None = None,
        bias: float | str | None = None,
        cell_batch_size: int = 64,
        cells: str = "auto",
    ) -> None:
        super().__init__()
        check_planner(planner)
        if cells not in CELL_MODES:
            raise ValueError(f"cells must be one of {CELL_MODES}, got {cells!r}")
        if budget < 1:
            raise ValueError(f"budget is the number of moves per episode, >= 1; got {budget}")
        if not 0 < discount < 1:
            raise ValueError(f"discount must be in (0, 1), got {discount}")
        self.vlm, self.planner, self.budget, self.blur, self.discount = vlm, planner, int(budget), blur, discount
        self.scale, self.bias, self.cell_batch_size, self.cells = scale, bias, cell_batch_size, cells

    def search(self, batch: dict[str, Any], k: int) -> SearchResult:
        """Episode ``k`` of the batch, searched on the zero-shot map."""
        grid = tuple(int(g) for g in batch["grid"][k])
        scores = zero_shot_scores(
            self.vlm,
            batch["image"][k],
            grid,
            episode_query(batch, k),
            self.scale,
            self.bias,
            self.cell_batch_size,
            self.cells,
        )
        start = tuple(int(s) for s in batch["start"][k])
        return run_search(
            batch["counts"][k].cpu(),
            planner_map(scores.cpu(), grid, self.blur),
            self.budget,
            self.planner,
            start,
            discount=self.discount,
        )

    @override
    def predict_step(self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0) -> dict[str, Any]:
        check_episode_batch(batch)
        out: dict[str, Any] = episode_outputs([self.search(batch, k) for k in range(len(batch["index"]))])
        out.update(index=batch["index"], domain=list(batch["domain"]))
        return out

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]:
        """One CSV row per episode; empty cells for steps not reached and for absent arms."""
        rows = []
        for k in range(len(outputs["index"])):
            row: dict[str, Any] = {"index": int(outputs["index"][k]), "domain": outputs["domain"][k]}
            n = int(outputs["n_targets"][k])
            row["n_targets"] = n
            for suffix in ("", "_zs"):
                if f"found{suffix}" not in outputs:
                    continue
                found = int(outputs[f"found{suffix}"][k])
                row[f"found{suffix}"] = found
                row[f"found_fraction{suffix}"] = f"{found / n:.6f}" if n else ""
                for which in MILESTONES:
                    step = int(outputs[f"steps_{which}{suffix}"][k])
                    row[f"steps_{which}{suffix}"] = step if step >= 0 else ""
            if "n_updates" in outputs:
                row["n_updates"] = int(outputs["n_updates"][k])
                row["ms_per_update"] = f"{float(outputs['ms_per_update'][k]):.3f}"
            rows.append({column: row.get(column, "") for column in self.prediction_columns})
        return rows

    def progress_values(self, row: dict[str, str]) -> dict[str, float | None]:
        """The running mean of the fraction found, for the progress bar."""
        return {"found": float(row["found_fraction"]) if row["found_fraction"] else None}

    def summarize_predictions(self, rows: list[dict[str, str]]) -> dict[str, Any]:
        """Metrics of the rows (as read back from the CSV): all of :func:`summarize_search` overall,
        :data:`DOMAIN_METRICS` per domain."""
        metrics = summarize_search(rows)
        metrics["headline"] = "found_fraction"  # what tta-report tabulates and plots
        domains = list(dict.fromkeys(r["domain"] for r in rows))
        metrics["domains"] = {
            d: {k: v for k, v in summarize_search([r for r in rows if r["domain"] == d]).items() if k in DOMAIN_METRICS}
            for d in domains
        }
        return metrics


def _numbers(rows: list[dict[str, str]], key: str) -> list[float]:
    return [float(r[key]) for r in rows if r.get(key, "") not in ("", None)]


def _mean(values: list[float]) -> float | None:
    return statistics.fmean(values) if values else None


def summarize_search(rows: list[dict[str, str]]) -> dict[str, Any]:
    """``n`` episodes; mean and std of the fraction found (episodes with targets); the fraction of
    all targets found; mean steps to the first/middle/last target over the episodes that reached
    it, and how many reached it; the same for the unadapted search (``*_zs``) with the adapted
    search's per-episode wins/ties/losses against it, and the updates' count and cost, when present."""
    metrics: dict[str, Any] = {"n": len(rows), "targets": int(sum(_numbers(rows, "n_targets")))}
    for suffix in ("", "_zs"):
        fractions = _numbers(rows, f"found_fraction{suffix}")
        if not fractions:
            continue
        metrics[f"found_fraction{suffix}"] = _mean(fractions)
        metrics[f"found_fraction_std{suffix}"] = statistics.pstdev(fractions)
        metrics[f"targets_found{suffix}"] = sum(_numbers(rows, f"found{suffix}")) / max(1, metrics["targets"])
        for which in MILESTONES:
            steps = _numbers(rows, f"steps_{which}{suffix}")
            metrics[f"steps_{which}{suffix}"] = _mean(steps)
            metrics[f"reached_{which}{suffix}"] = len(steps)
    if "found_fraction_zs" in metrics:
        pairs = [
            (float(r["found_fraction"]), float(r["found_fraction_zs"]))
            for r in rows
            if r.get("found_fraction") not in ("", None) and r.get("found_fraction_zs") not in ("", None)
        ]
        metrics["wins"] = sum(a > b + 1e-9 for a, b in pairs)
        metrics["ties"] = sum(math.isclose(a, b, abs_tol=1e-9) for a, b in pairs)
        metrics["losses"] = sum(a < b - 1e-9 for a, b in pairs)
    updates = _numbers(rows, "n_updates")
    if updates:
        metrics["updates_per_episode"] = _mean(updates)
        costs = [float(r["ms_per_update"]) for r in rows if r.get("n_updates") not in ("", None, "0")]
        metrics["ms_per_update"] = _mean(costs)
    return metrics
