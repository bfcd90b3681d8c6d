"""Write prediction rows as batches finish, resume a stopped run, gather DDP ranks, write metrics.

Files in ``output_dir``:

- ``predictions.csv``: one row per sample (per group, per episode: whatever the task's unit
  is), the columns the LightningModule declares (``prediction_columns``); no timing, so the
  same command with the same seed writes the same bytes;
- ``timing.csv``: ``index, ms, adapt_ms`` in the same row order;
- ``progress.json``: the batches written so far (rows per batch, file sizes), rewritten
  atomically after every batch: what a rerun resumes from;
- ``metrics.json``: at the end, from the rows.

Under DDP each process writes its own part in ``parts/rank<r>of<W>/``; at the end rank 0
merges the parts into ``predictions.csv``/``timing.csv`` in stream order, so the files and
``metrics.json`` are those of a one-device run.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import io
import json
import logging
import os
import re
import resource
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.loggers import Logger
from typing_extensions import override

TIMING_COLUMNS = ("index", "ms", "adapt_ms")
log = logging.getLogger(__name__)

#: metrics.json keys that depend on the machine and the moment, not on the predictions.
TIMING_KEYS = ("ms_per_sample", "adapt_ms_per_sample", "peak_mem_mb")


@runtime_checkable
class PredictionTask(Protocol):
    """What a LightningModule provides for :class:`PredictionWriter` to write its predictions.

    - ``prediction_columns``: the CSV columns, ``index`` and ``domain`` among them;
    - ``prediction_rows(outputs)``: one row per batch item, from ``predict_step``'s output dict
      as the TTA callbacks left it; values are written with ``str`` (``None`` as empty), so
      format floats as they should be stored;
    - ``summarize_predictions(rows)``: metrics from the rows as read back from the CSV (all
      values ``str``): ``n``, the task's metrics, and ``domains`` (per domain ``n`` and metrics);
      optionally ``headline``, the name of the metric ``tta-report`` tabulates (default
      ``accuracy``);
    - ``progress_values(row)``: per row, the values whose running means the progress bar
      shows (e.g. ``{"acc": 1.0}``; a missing or ``None`` value is not counted).
    """

    prediction_columns: Sequence[str]

    def prediction_rows(self, outputs: dict[str, Any]) -> list[dict[str, Any]]: ...

    def summarize_predictions(self, rows: list[dict[str, str]]) -> dict[str, Any]: ...

    def progress_values(self, row: dict[str, str]) -> dict[str, float | None]: ...


def reset_peak_memory(device: torch.device) -> None:
    """Start a new high-water mark, so that runs sharing a process (a multirun's jobs) each
    report their own peak: the CUDA allocator's peak, or on Linux the process's peak resident
    set size (``/proc/self/clear_refs``; elsewhere the peak stays the process's lifetime one)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
        return
    # hand memory that earlier runs of this process freed back to the OS first, so that the
    # mark starts from what is live now rather than from the allocator's leftovers
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")
    except (OSError, AttributeError):  # not Linux with glibc: the mark stays the process's lifetime one
        pass


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: peak allocated on the device since :func:`reset_peak_memory`. CPU: the process's
    peak resident set size (libraries and the model included) since the last reset on Linux,
    over the process's life elsewhere."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(re.search(r"VmHWM:\s+(\d+)", status).group(1)) / 1024  # KiB
    except (OSError, AttributeError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak / 2**20 if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``predictions.csv`` or ``timing.csv``, values as written (``str``)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(data, indent=2) + "\n")
    os.replace(temporary, path)


def _csv_text(rows: list[dict[str, Any]], columns: Sequence[str]) -> str:
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


class _Part:
    """One process's ``predictions.csv`` + ``timing.csv`` + ``progress.json``, appended batch by batch."""

    def __init__(self, directory: Path, columns: Sequence[str], run_key: str) -> None:
        self.directory, self.columns, self.run_key = directory, tuple(columns), run_key
        self.predictions = directory / "predictions.csv"
        self.timing = directory / "timing.csv"
        self.progress = directory / "progress.json"
        self.batches: list[int] = []
        self.skipped_images = 0  # images left out of the batches written (undecodable), all sessions
        self.peak_mem_mb: float | None = None  # this session's, once closed

    def open(self) -> int:
        """Open for appending after the last complete batch; returns the number of batches done."""
        self.directory.mkdir(parents=True, exist_ok=True)
        if self.progress.is_file():
            state = json.loads(self.progress.read_text())
            if state["run_key"] != self.run_key or tuple(state["columns"]) != self.columns:
                raise ValueError(
                    f"{self.directory} holds the results of a different run ({state['run_key']}): "
                    "rerun the same command to resume it, or write to an empty directory "
                    "(e.g. hydra.run.dir=<new dir>)"
                )
            self.batches = list(state["batches"])
            self.skipped_images = int(state["skipped_images"])
            # rows written after the last recorded batch belong to a batch that did not finish
            for path, size in ((self.predictions, state["predictions_bytes"]), (self.timing, state["timing_bytes"])):
                with open(path, "r+b") as f:
                    f.truncate(size)
        else:
            self.batches, self.skipped_images = [], 0
            self.predictions.write_text(",".join(self.columns) + "\n")
            self.timing.write_text(",".join(TIMING_COLUMNS) + "\n")
            self._save()
        # kept open for the whole run (appended batch by batch), closed in close()
        self._predictions = open(self.predictions, "a", newline="")  # noqa: SIM115
        self._timing = open(self.timing, "a", newline="")  # noqa: SIM115
        return len(self.batches)

    def append(self, rows: list[dict[str, Any]], timing: list[dict[str, Any]], skipped_images: int) -> None:
        self._predictions.write(_csv_text(rows, self.columns))
        self._timing.write(_csv_text(timing, TIMING_COLUMNS))
        self._predictions.flush()
        self._timing.flush()
        self.batches.append(len(rows))
        self.skipped_images += skipped_images
        self._save()

    def close(self, peak_mem_mb: float) -> None:
        self._predictions.close()
        self._timing.close()
        self.peak_mem_mb = peak_mem_mb
        self._save()

    def _save(self) -> None:
        _write_json_atomic(
            self.progress,
            {
                "run_key": self.run_key,
                "columns": list(self.columns),
                "batches": self.batches,
                "skipped_images": self.skipped_images,
                "peak_mem_mb": self.peak_mem_mb,
                "predictions_bytes": self.predictions.stat().st_size,
                "timing_bytes": self.timing.stat().st_size,
            },
        )


class PredictionWriter(pl.Callback):
    """Rows appended and flushed batch by batch; a rerun resumes; metrics at the end.

    Rows are written when the *next* batch starts (or ``predict`` ends), so every callback's
    changes to the batch's outputs are in, whatever the order of the callback list. ``ms`` is
    the batch's wall time per sample, from its start to the next batch's start (data loading,
    adaptation and prediction included, this writer's own I/O excluded); ``adapt_ms`` the
    part of it spent in TTA callbacks (0 without one).

    Resume: if ``output_dir`` holds an unfinished run with the same ``run_key``, the finished
    batches are kept and the datamodule is asked to start after them
    (``resume_from_batch``, see ``tta.datamodules.streams.StreamDataModule``); a finished run
    is not predicted again. The final ``metrics.json`` equals an uninterrupted run's, timing
    and memory (:data:`TIMING_KEYS`) aside.

    ``metrics.json`` holds ``method`` (the TTA callbacks' ``method_name`` joined by "+", or
    "none"), ``model``, ``data``, ``seed``, the task's metrics (``summarize_predictions``:
    for classifiers ``n``, ``accuracy``, ``ece``), ``ms_per_sample``, ``adapt_ms_per_sample``,
    ``peak_mem_mb`` (the maximum over processes), ``skipped_images`` (images the datamodule
    could not decode: the batches' ``skipped_images``, summed), ``run`` (``run_info``, e.g. the CLI's config)
    and ``domains`` (per domain the task's metrics and ``ms_per_sample``).

    Args:
        output_dir: where the files go.
        seed: the run seed, recorded in ``metrics.json``.
        run_key: identifies the run for resuming (the CLI passes its resolved config); a
            directory holding another run's rows is refused. ``None``: method, model, data
            and seed.
        run_info: plain data recorded as ``run`` in ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str | Path = ".",
        seed: int | None = None,
        run_key: str | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        self.output_dir = Path(output_dir)
        self.seed, self.run_key, self.run_info = seed, run_key, run_info
        self.metrics: dict[str, Any] | None = None
        self.progress: dict[str, float] = {}
        self._progress_sums: dict[str, list[float]] = {}
        self._pending: tuple[dict[str, Any] | None, float, int] | None = None
        self._part: _Part | None = None
        self._rank, self._world_size = 0, 1

    @property
    def predictions_path(self) -> Path:
        return self.output_dir / "predictions.csv"

    @property
    def timing_path(self) -> Path:
        return self.output_dir / "timing.csv"

    @property
    def metrics_path(self) -> Path:
        return self.output_dir / "metrics.json"

    @override
    def setup(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        if stage != "predict":
            return
        if not isinstance(pl_module, PredictionTask):
            raise TypeError(
                f"PredictionWriter writes what the LightningModule declares: give "
                f"{type(pl_module).__name__} prediction_columns, prediction_rows, summarize_predictions "
                "and progress_values (see tta.callbacks.writer.PredictionTask)"
            )
        self._rank, self._world_size = trainer.global_rank, trainer.world_size
        if self._world_size > 1 and not hasattr(trainer.datamodule, "resume_from_batch"):
            raise ValueError(
                f"{type(trainer.datamodule).__name__} does not deal whole batches to the "
                f"{self._world_size} processes, so their rows cannot be merged in stream order: "
                "subclass tta.datamodules.streams.StreamDataModule, or predict on one device"
            )
        self._check_world_size()
        directory = self.output_dir
        if self._world_size > 1:
            directory = self.output_dir / "parts" / f"rank{self._rank}of{self._world_size}"
        self._part = _Part(directory, pl_module.prediction_columns, self._key(trainer, pl_module))
        done = self._part.open()
        self._progress_sums = {}
        self._count_progress(pl_module, read_rows(self._part.predictions))
        datamodule = trainer.datamodule
        if hasattr(datamodule, "resume_from_batch"):
            datamodule.resume_from_batch(done)  # 0 too: a datamodule reused from a resumed run starts over
        elif done:
            raise ValueError(
                f"{self.output_dir} holds {done} finished batches but {type(datamodule).__name__} "
                "cannot start after them: subclass tta.datamodules.streams.StreamDataModule, "
                "or write to an empty directory"
            )
        if done:
            total = datamodule.stream_sampler().n_batches if hasattr(datamodule, "stream_sampler") else None
            if total is not None and done >= total:
                log.info("%s: already finished (%d batches); metrics recomputed from its rows", directory, done)
            else:
                log.info(
                    "%s: resuming after batch %d of %s; the finished batches' rows are kept", directory, done, total
                )

    @override
    def on_predict_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        reset_peak_memory(pl_module.device)
        self._pending = None
        for logger in trainer.loggers:
            logger.log_hyperparams(self.run_info or json.loads(self._key(trainer, pl_module)))

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._flush(trainer, pl_module, time.perf_counter())
        self._pending = (None, time.perf_counter(), 0)  # after the flush: this writer's I/O is in no batch's ms

    @override
    def on_predict_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: Any,
        batch: Any,
        batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        skipped = int(batch.get("skipped_images", 0)) if isinstance(batch, dict) else 0
        self._pending = (outputs, self._pending[1], skipped)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module, time.perf_counter())

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # not on_predict_end: Lightning skips the predict hooks of a process with no batch left
        # (a finished run, a resumed rank that was done), but every process reaches teardown
        if stage != "predict" or self._part is None:
            return
        self._part.close(peak_memory_mb(trainer.strategy.root_device))
        self._part = None
        trainer.strategy.barrier("tta-prediction-writer")
        if trainer.is_global_zero:
            if self._world_size > 1:
                self._merge_parts(pl_module.prediction_columns)
            parts = (
                [
                    self.output_dir / "parts" / f"rank{r}of{self._world_size}" / "progress.json"
                    for r in range(self._world_size)
                ]
                if self._world_size > 1
                else [self.output_dir / "progress.json"]
            )
            states = [json.loads(p.read_text()) for p in parts]
            peak = max(state["peak_mem_mb"] for state in states)
            skipped = sum(state["skipped_images"] for state in states)
            self.metrics = self._compute_metrics(trainer, pl_module, peak, skipped)
            _write_json_atomic(self.metrics_path, self.metrics)
            log_final_metrics(trainer.loggers, self.metrics)
        trainer.strategy.barrier("tta-prediction-writer-done")

    def _key(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> str:
        if self.run_key is not None:
            return self.run_key
        return json.dumps(
            {
                "method": _method_name(trainer),
                "model": _model_name(pl_module),
                "data": _data_name(trainer),
                "seed": self.seed,
            },
            sort_keys=True,
        )

    def _check_world_size(self) -> None:
        parts = self.output_dir / "parts"
        other = (
            [p.name for p in parts.glob("rank*of*") if not p.name.endswith(f"of{self._world_size}")]
            if parts.is_dir()
            else []
        )
        single = (self.output_dir / "progress.json").is_file() and not parts.is_dir()
        if other or (single and self._world_size > 1):
            found = other[0].split("of")[-1] if other else "1"
            raise ValueError(
                f"{self.output_dir} holds a run on {found} process(es) but this one has "
                f"{self._world_size}: resume it with the same number of devices, or write to an "
                "empty directory"
            )

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: float) -> None:
        if self._pending is None or self._pending[0] is None:
            return
        outputs, started, skipped = self._pending
        self._pending = None
        n = len(outputs["index"])
        # a batch whose images all failed to decode is recorded with 0 rows: it is done too
        rows = pl_module.prediction_rows(outputs) if n else []
        ms = (now - started) * 1000 / max(1, n)
        adapt_ms = outputs.get("adapt_ms")
        # adaptation that ran before the batches (a set-level method's fit) is in no batch's
        # wall time: each sample's share of it is added, so ms always includes adapt_ms
        fit_ms = outputs.get("fit_ms")
        timing = [
            {
                "index": row["index"],
                "ms": f"{ms + (float(fit_ms[i]) if fit_ms is not None else 0.0):.4f}",
                "adapt_ms": f"{float(adapt_ms[i]):.4f}" if adapt_ms is not None else f"{0.0:.4f}",
            }
            for i, row in enumerate(rows)
        ]
        self._part.append(rows, timing, skipped)
        self._count_progress(pl_module, [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows])
        if self.progress:
            step = len(self._part.batches)
            for logger in trainer.loggers:
                logger.log_metrics({f"running/{name}": value for name, value in self.progress.items()}, step=step)

    def _count_progress(self, pl_module: pl.LightningModule, rows: list[dict[str, str]]) -> None:
        for row in rows:
            for name, value in pl_module.progress_values(row).items():
                if value is not None:
                    total = self._progress_sums.setdefault(name, [0.0, 0])
                    total[0] += float(value)
                    total[1] += 1
        self.progress = {name: total / count for name, (total, count) in self._progress_sums.items() if count}

    def _merge_parts(self, columns: Sequence[str]) -> None:
        """Interleave the ranks' batches back into stream order (batch ``g`` came from rank ``g % W``)."""
        parts = [self.output_dir / "parts" / f"rank{r}of{self._world_size}" for r in range(self._world_size)]
        progress = [json.loads((p / "progress.json").read_text())["batches"] for p in parts]
        for name, header in (("predictions.csv", columns), ("timing.csv", TIMING_COLUMNS)):
            lines = []
            for part in parts:
                with open(part / name, newline="") as f:
                    lines.append(f.read().splitlines(keepends=True)[1:])
            merged, cursors = [",".join(header) + "\n"], [0] * self._world_size
            for g in range(sum(len(b) for b in progress)):
                rank, local = g % self._world_size, g // self._world_size
                count = progress[rank][local]
                merged += lines[rank][cursors[rank] : cursors[rank] + count]
                cursors[rank] += count
            temporary = self.output_dir / (name + ".tmp")
            temporary.write_text("".join(merged))
            os.replace(temporary, self.output_dir / name)

    def _compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, peak_mem_mb: float, skipped_images: int
    ) -> dict[str, Any]:
        rows = read_rows(self.predictions_path)
        ms = [float(r["ms"]) for r in read_rows(self.timing_path)]
        adapt_ms = [float(r["adapt_ms"]) for r in read_rows(self.timing_path)]
        metrics: dict[str, Any] = {
            "method": _method_name(trainer),
            "model": _model_name(pl_module),
            "data": _data_name(trainer),
            "seed": self.seed,
        }
        summary = pl_module.summarize_predictions(rows)
        domains = summary.pop("domains")
        metrics.update(summary)
        metrics["ms_per_sample"] = sum(ms) / max(1, len(ms))
        metrics["adapt_ms_per_sample"] = sum(adapt_ms) / max(1, len(adapt_ms))
        metrics["peak_mem_mb"] = peak_mem_mb
        metrics["skipped_images"] = skipped_images
        if self.run_info is not None:
            metrics["run"] = self.run_info
        for name, values in domains.items():
            picked = [(t, a) for t, a, r in zip(ms, adapt_ms, rows) if r["domain"] == name]
            values["ms_per_sample"] = sum(t for t, _ in picked) / max(1, len(picked))
            values["adapt_ms_per_sample"] = sum(a for _, a in picked) / max(1, len(picked))
        metrics["domains"] = domains
        return metrics


def log_final_metrics(loggers: Sequence[Logger], metrics: dict[str, Any]) -> None:
    """The run's numeric metrics, overall (``all/<name>``) and per domain (``<domain>/<name>``),
    through Lightning's logger API; then the loggers are saved and finalised."""
    if not loggers:
        return
    flat = {f"all/{k}": float(v) for k, v in metrics.items() if _is_number(v)}
    for domain, values in metrics["domains"].items():
        flat |= {f"{domain}/{k}": float(v) for k, v in values.items() if _is_number(v)}
    for logger in loggers:
        logger.log_metrics(flat)
        logger.save()
        logger.finalize("success")


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _method_name(trainer: pl.Trainer) -> str:
    return "+".join(c.method_name for c in trainer.callbacks if hasattr(c, "method_name")) or "none"


def _model_name(pl_module: pl.LightningModule) -> str:
    return getattr(pl_module, "model_name", type(pl_module).__name__)


def _data_name(trainer: pl.Trainer) -> str:
    datamodule = trainer.datamodule
    return getattr(datamodule, "name", type(datamodule).__name__)
