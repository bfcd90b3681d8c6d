"""Write prediction rows as batches finish, resume a stopped run, gather DDP ranks, write metrics.

A Lightning adapter over :mod:`tta.run_folder`, which owns the files (lock, verification,
appending, resume point, merging the ranks). Files in ``output_dir``:

- ``predictions.csv``: one row per sample (per group, per episode: whatever the task's unit
  is), the columns the LightningModule declares (``prediction_columns``); no timing, so the
  same command with the same seed writes the same bytes;
- ``timing.csv``: ``index, ms, adapt_ms`` in the same row order;
- ``progress.json``: the run's settings and the batches written so far (rows, and the size and
  hash of their bytes), rewritten atomically after every batch: what a rerun verifies and
  resumes from;
- ``run.lock``: held by the writing process for the whole run;
- ``stream_state-<batches>.safetensors``: with online methods (``tta.callbacks.online.OnlineTTA``),
  their state after that many finished batches, named in ``progress.json`` (saved with every batch
  unless saving takes more than :data:`STATE_SAVE_SHARE` of the run's time, and before a stop);
- ``metrics.json``: at the end, from the rows.

Under DDP each process writes its own part in ``parts/rank<r>of<W>/``; at the end rank 0
merges the parts into ``predictions.csv``/``timing.csv`` in stream order, so the files and
``metrics.json`` are those of a one-device run.
"""

from __future__ import annotations

import ctypes
import enum
import gc
import hashlib
import inspect
import json
import logging
import re
import resource
import signal
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Checkpoint, ModelSummary, ProgressBar
from pytorch_lightning.loggers import Logger
from safetensors.torch import load as safetensors_load
from safetensors.torch import save as safetensors_save
from typing_extensions import override

from tta.callbacks.base import seed_in_force
from tta.callbacks.online import OnlineTTA
from tta.fingerprint import weights_fingerprint
from tta.run_folder import (
    DirectoryLock,
    RunFolderError,
    RunPart,
    RunStopped,
    StopSignals,
    merge_parts,
    part_directory,
    read_rows,
    wait_for_stopped_process,
    write_atomic,
)

log = logging.getLogger(__name__)
#: How long a DDP process waits for its part of the run directory to be let go by a process of
#: a killed run (which stops after its current batch, see ``tta.cli.stop_with_launching_process``).
DDP_PART_WAIT_S = 60.0
#: The most of a run's time that saving the online methods' state may take: the state is saved with a
#: batch once the time since the last save is at least the last save's duration over this share (with
#: every batch while saving is quick; a large state, e.g. DOTA's covariances on ImageNet, less often),
#: and always with the batch that ends the run or before a stop. A resume starts after the last saved
#: state and redoes the batches after it, with the same rows.
STATE_SAVE_SHARE = 0.1
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


def _plain(value: Any, depth: int) -> Any:
    """``value`` as plain data (JSON types) for a run's settings."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, enum.Enum):
        return _plain(value.value, depth)
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, depth) for v in value]
    if isinstance(value, dict):
        return {str(k): _plain(v, depth) for k, v in value.items()}
    if isinstance(value, (torch.dtype, torch.device)):
        return str(value)
    if isinstance(value, torch.Tensor):
        data = value.detach().to("cpu").contiguous()
        return {"shape": list(data.shape), "sha256": hashlib.sha256(data.numpy().tobytes()).hexdigest()[:16]}
    kind = type(value)
    if kind.__module__.startswith("tta.") and depth < 2:
        return object_settings(value, depth=depth + 1)  # our own building blocks, e.g. the VLM wrapper
    return f"{kind.__module__}.{kind.__qualname__}"


#: Classes whose constructor arguments are not a run's settings (Lightning's and PyTorch's bases).
_FRAMEWORK_MODULES = ("pytorch_lightning", "lightning_fabric", "torch", "builtins", "typing")


def constructor_arguments(obj: Any) -> list[str]:
    """The names of the arguments of ``obj``'s constructors (its class's and its bases', framework
    bases aside), in order."""
    names: list[str] = []
    for cls in type(obj).__mro__:
        init = cls.__dict__.get("__init__")
        if init is None or cls.__module__.split(".")[0] in _FRAMEWORK_MODULES:
            continue
        names += [
            p.name
            for p in list(inspect.signature(init).parameters.values())[1:]
            if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)
        ]
    return list(dict.fromkeys(names))


def _argument_attributes(obj: Any) -> dict[str, str | None]:
    """The ``argument_attributes`` of ``obj``'s class and bases, the class's own winning."""
    found: dict[str, str | None] = {}
    for cls in reversed(type(obj).__mro__):
        found.update(cls.__dict__.get("argument_attributes", {}))
    return found


_COVERED = object()  # an argument whose content the run key holds elsewhere (its inputs), or that cannot change rows


def _argument_value(obj: Any, name: str, sources: dict[str, str | None]) -> Any:
    """The value of constructor argument ``name``: where ``argument_attributes`` says it is kept
    (a dotted attribute path; ``None``: covered by the run's inputs or unable to change rows), else
    the attribute of that name. Raises AttributeError where it is kept nowhere."""
    if name in sources:
        if sources[name] is None:
            return _COVERED
        try:
            value = obj
            for part in sources[name].split("."):
                value = getattr(value, part)
            return value
        except AttributeError:
            pass  # a subclass that keeps it under its own name
    try:
        return getattr(obj, name)
    except RuntimeError as error:  # a property that needs a trainer
        raise AttributeError(name) from error


def object_settings(obj: Any, fallback: Any = None, depth: int = 0) -> dict[str, Any]:
    """The class of ``obj`` and the values of its constructor's arguments, as plain data.

    An argument is read from the attribute of the same name (the convention of the datamodules,
    tasks and callbacks here), or from where the class's ``argument_attributes`` says it is kept
    (``{"resize_mode": "preprocess.resize_mode"}``; ``None`` for arguments whose content the run
    key holds as a fingerprint, such as a data set's list of files, or that cannot change the rows,
    such as the view store's folder). Arguments kept nowhere cannot
    be seen: they are listed under ``unrecorded`` (every class of this package keeps all of its
    arguments; a test checks it).

    ``fallback``: where a value is ``None``, the attribute of the same name there, as the tasks
    take ``class_names=None`` from the datamodule in ``setup``: the settings are then the same
    before and after ``setup``.
    """
    settings: dict[str, Any] = {"class": f"{type(obj).__module__}.{type(obj).__qualname__}"}
    sources = _argument_attributes(obj)
    unrecorded = []
    for name in constructor_arguments(obj):
        try:
            value = _argument_value(obj, name, sources)
        except AttributeError:
            unrecorded.append(name)
            continue
        if value is _COVERED:
            continue
        if value is None and fallback is not None:
            value = getattr(fallback, name, None)
        settings[name] = _plain(value, depth)
    if unrecorded:
        settings["unrecorded"] = unrecorded
    return settings


def unrecorded_arguments(settings: Any, owner: str = "") -> list[str]:
    """``Class.argument`` for every constructor argument that :func:`object_settings` could not see,
    anywhere in a run's settings."""
    if isinstance(settings, list):
        return [found for item in settings for found in unrecorded_arguments(item, owner)]
    if not isinstance(settings, dict):
        return []
    owner = str(settings.get("class", owner)).rsplit(".", 1)[-1]
    found = [f"{owner}.{name}" for name in settings.get("unrecorded", [])]
    return found + [
        item for key, value in settings.items() if key != "unrecorded" for item in unrecorded_arguments(value, owner)
    ]


#: Callbacks that show or save things but never change the rows.
_BOOKKEEPING_CALLBACKS = (ProgressBar, ModelSummary, Checkpoint)


def run_inputs(pl_module: pl.LightningModule, datamodule: Any) -> dict[str, Any]:
    """What a run reads beyond its settings (:mod:`tta.fingerprint`): the module's weights, for
    datamodules that read files (``content_fingerprint``) the files' listing, and a class-prompts
    file's SHA-256 where the module reads one."""
    content = getattr(datamodule, "content_fingerprint", None)
    inputs = {"weights": weights_fingerprint(pl_module), "data": content() if callable(content) else None}
    prompts = getattr(pl_module, "class_prompts_fingerprint", None)
    if callable(prompts) and prompts() is not None:  # a file of sentences per class (model.class_prompts)
        inputs["prompts"] = prompts()
    return inputs


def run_settings(trainer: pl.Trainer, pl_module: pl.LightningModule, seed: int | None) -> dict[str, Any]:
    """Everything that determines a run's rows, as plain data: the seed given and the one in force
    (:func:`seed_in_force`), the trainer's precision, the settings (:func:`object_settings`) of the
    LightningModule, the datamodule and every callback but the bookkeeping ones (progress bars,
    summaries, checkpoints, writers), and the fingerprints of the weights and data files
    (:func:`run_inputs`)."""
    datamodule = trainer.datamodule
    return {
        "seed": seed,
        "seed_in_force": seed_in_force(),
        "precision": str(trainer.precision),
        "model": object_settings(pl_module, fallback=datamodule),
        "data": None if datamodule is None else object_settings(datamodule),
        "callbacks": [
            object_settings(c)
            for c in trainer.callbacks
            if not isinstance(c, (*_BOOKKEEPING_CALLBACKS, PredictionWriter))
        ],
        "inputs": run_inputs(pl_module, datamodule),
    }


class PredictionWriter(pl.Callback):
    """Rows appended and flushed batch by batch; a rerun resumes; metrics at the end.

    Rows are written when the *next* batch starts (or ``predict`` ends), so every callback's
    changes to the batch's outputs are in, whatever the order of the callback list. ``ms`` is
    the batch's wall time per sample, from its start to the next batch's start (data loading,
    adaptation and prediction included, this writer's own I/O excluded, a set-level method's
    ``fit_ms`` share added); ``adapt_ms`` the part of it spent in TTA callbacks (0 without one).

    The run folder (:mod:`tta.run_folder`) is locked for the whole run: a second writer into it
    stops at once with a :class:`~tta.run_folder.RunFolderError` naming the holder's PID.

    Resume: if ``output_dir`` holds an unfinished run with the same settings (``run_key``), its
    files are verified against ``progress.json``, the finished batches are kept and the
    datamodule is asked to start after them (``resume_from_batch``, see
    ``tta.datamodules.streams.StreamDataModule``); a finished run is not predicted again. The
    final ``metrics.json`` equals an uninterrupted run's, timing and memory
    (:data:`TIMING_KEYS`) aside. A folder holding another run's rows, or rows that do not verify,
    is refused with a :class:`~tta.run_folder.RunFolderError` before anything is written.

    Stop signals: during ``predict``, SIGTERM or SIGINT lets the current batch finish, writes
    its rows, and raises :class:`~tta.run_folder.RunStopped` ("stopped by SIGTERM after batch k
    of n; rerun the same command to resume") out of ``Trainer.predict``; a second SIGINT raises
    it at once, mid-batch (that batch is redone on resume). Under DDP, rank 0 passes the stop on
    (as SIGTERM) to the processes it started.

    ``metrics.json`` holds ``method`` (the TTA callbacks' ``method_name`` joined by "+", or
    "none"), ``model``, ``data``, ``seed`` (``seed``, else the seed in force), the task's
    metrics (``summarize_predictions``: for classifiers ``n``, ``accuracy``, ``ece``),
    ``ms_per_sample``, ``adapt_ms_per_sample``, ``peak_mem_mb`` (the maximum over processes),
    ``skipped_images`` (images the datamodule could not decode: the batches' ``skipped_images``,
    summed) and ``skipped_image_paths`` (the first of them, from the batches' ``skipped_paths``),
    ``run`` (``run_info``, e.g. the CLI's config), ``key`` (the run key: what ``tta-report``
    groups runs by) and ``domains`` (per domain the task's metrics, ``ms_per_sample`` and
    ``adapt_ms_per_sample``). Skipped images are also reported in a warning at the end.

    Lightning loggers of the trainer (``Trainer(logger=...)``) get the run's settings as
    hyperparameters, the running values of the progress bar after every batch
    (``running/<name>``), and at the end the metrics overall (``all/<name>``) and per domain
    (``<domain>/<name>``).

    Args:
        output_dir: where the files go.
        seed: the run seed, recorded in ``metrics.json``.
        run_key: the run's settings, plain data (the CLI passes its resolved config with the
            fingerprints of :func:`run_inputs`); a directory holding another run's rows is
            refused. ``None``: :func:`run_settings` (the seed given and the one in force,
            precision, the module's, datamodule's and callbacks' settings, the weights' and the
            data files' fingerprints).
        run_info: plain data recorded as ``run`` in ``metrics.json``.
    """

    def __init__(
        self,
        output_dir: str | Path = ".",
        seed: int | None = None,
        run_key: dict[str, Any] | None = None,
        run_info: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if run_key is not None and not isinstance(run_key, dict):
            raise TypeError(f"run_key must be a dict of the run's settings (plain data) or None, got {run_key!r}")
        self.output_dir = Path(output_dir)
        self.seed, self.run_key, self.run_info = seed, run_key, run_info
        self.metrics: dict[str, Any] | None = None
        self.progress: dict[str, float] = {}
        self._progress_sums: dict[str, list[float]] = {}
        self._pending: tuple[dict[str, Any] | None, float, dict[str, Any]] | None = None
        self._run: dict[str, Any] = {}  # the run's settings, from setup on
        self._part: RunPart | None = None
        self._run_lock: DirectoryLock | None = None  # rank 0 of several: the whole directory
        # a second Ctrl-C stops at once, as a stop after the batches written so far
        self._stop = StopSignals(
            stop_now=lambda: RunStopped(signal.SIGINT, len(self._part.batches), self._total_batches)
        )
        self._total_batches = 0
        self._rank, self._world_size = 0, 1
        self._online: list[OnlineTTA] = []  # the run's online methods, whose state goes with each batch
        self._state_saved_at, self._state_save_s = float("-inf"), 0.0  # when the state was saved, in how long

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
        directory = self.output_dir
        if self._world_size > 1:
            directory = part_directory(self.output_dir, self._rank, self._world_size)
            if self._rank == 0:
                self._run_lock = DirectoryLock(self.output_dir).acquire()
        # on an error from here on, Lightning calls on_exception, which lets the folder go
        self._check_world_size()
        self._run = self.run_key if self.run_key is not None else run_settings(trainer, pl_module, self.seed)
        unseen = unrecorded_arguments(self._run)
        if unseen:
            log.warning(
                "the run key cannot see %s (kept under no attribute of the same name): a rerun that changes "
                "them would resume this run's rows; keep each constructor argument as an attribute of its name",
                ", ".join(unseen),
            )
        self._part = RunPart(directory, self._run, pl_module.prediction_columns)
        # a DDP process of a run killed just before may still be finishing its batch in this part
        # (it stops within seconds of its launching process): wait for it rather than fail
        done = self._part.open(wait_s=DDP_PART_WAIT_S if self._world_size > 1 else 0.0)
        self._online = [callback for callback in trainer.callbacks if isinstance(callback, OnlineTTA)]
        self._state_saved_at, self._state_save_s = float("-inf"), 0.0
        if done and self._online:
            self._resume_stream_state(done)
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
        self._total_batches = len(self._part.batches) + int(sum(trainer.num_predict_batches))
        # installed after Lightning's own SIGTERM handler, which Lightning puts back (with the
        # handlers from before predict) when predict ends, however it ends
        launcher = trainer.strategy.launcher
        self._stop.forward = (lambda _: launcher.kill(signal.SIGTERM)) if launcher is not None else None
        self._stop.install()
        for logger in trainer.loggers:
            logger.log_hyperparams(self.run_info or self._run)

    @override
    def on_predict_batch_start(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int, dataloader_idx: int = 0
    ) -> None:
        self._flush(trainer, pl_module, time.perf_counter())
        if self._stop.received is not None:
            raise RunStopped(self._stop.received, len(self._part.batches), self._total_batches)
        self._pending = (None, time.perf_counter(), {})  # after the flush: this writer's I/O is in no batch's ms

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
        skipped = {"skipped_images": 0, "skipped_paths": []}
        if isinstance(batch, dict):
            skipped = {
                "skipped_images": int(batch.get("skipped_images", 0)),
                "skipped_paths": [str(p) for p in batch.get("skipped_paths", [])],
            }
        self._pending = (outputs, self._pending[1], skipped)

    @override
    def on_predict_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._flush(trainer, pl_module, time.perf_counter(), last=True)

    @override
    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        # a batch that had not reached the next batch's start is not written: it is redone on resume
        self._stop.restore()
        if self._part is not None:
            self._part.abort()
            self._part = None
        self._release()
        if isinstance(exception, RunStopped):
            # the DDP processes this one started stop after their own batch (or, done with their part,
            # are ended at the end's barrier): wait for them, so that a rerun finds their parts free
            first = trainer.node_rank * trainer.num_devices + 1
            for rank, process in enumerate(getattr(trainer.strategy.launcher, "procs", []), start=first):
                wait_for_stopped_process(process, part_directory(self.output_dir, rank, self._world_size))

    @override
    def teardown(self, trainer: pl.Trainer, pl_module: pl.LightningModule, stage: str) -> None:
        # not on_predict_end: Lightning skips the predict hooks of a process with no batch left
        # (a finished run, a resumed rank that was done), but every process reaches teardown
        if stage != "predict" or self._part is None:
            return
        self._stop.restore()
        self._part.close(peak_memory_mb(trainer.strategy.root_device))
        self._part = None
        trainer.strategy.barrier("tta-prediction-writer")
        try:
            if trainer.is_global_zero:
                if self._world_size > 1:
                    states = merge_parts(self.output_dir, self._run, pl_module.prediction_columns, self._world_size)
                else:
                    states = [json.loads((self.output_dir / "progress.json").read_text())]
                self.metrics = self._compute_metrics(trainer, pl_module, states)
                write_atomic(self.metrics_path, json.dumps(self.metrics, indent=2) + "\n")
                log_final_metrics(trainer.loggers, self.metrics)
                if self.metrics["skipped_images"]:
                    log.warning(
                        "%d images could not be decoded and were left out, e.g. %s (data.on_bad_image=error "
                        "stops at the first one instead)",
                        self.metrics["skipped_images"],
                        ", ".join(self.metrics["skipped_image_paths"]),
                    )
        finally:
            self._release()
        trainer.strategy.barrier("tta-prediction-writer-done")

    def _release(self) -> None:
        if self._run_lock is not None:
            self._run_lock.release()
            self._run_lock = None

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
            raise RunFolderError(
                f"{self.output_dir} holds a run on {found} process(es) but this one has "
                f"{self._world_size}: resume it with the same number of devices, or write to an "
                "empty directory"
            )

    def _flush(self, trainer: pl.Trainer, pl_module: pl.LightningModule, now: float, last: bool = False) -> None:
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
        # wall time: each sample's share of it is added, so that ms always includes adapt_ms
        fit_ms = outputs.get("fit_ms")
        timing = [
            {
                "index": row["index"],
                "ms": f"{ms + (float(fit_ms[i]) if fit_ms is not None else 0.0):.4f}",
                "adapt_ms": f"{float(adapt_ms[i]):.4f}" if adapt_ms is not None else f"{0.0:.4f}",
            }
            for i, row in enumerate(rows)
        ]
        saving = bool(self._online) and (
            last
            or self._stop.received is not None
            or now - self._state_saved_at >= self._state_save_s / STATE_SAVE_SHARE
        )
        began = time.perf_counter()
        self._part.append(rows, timing, **skipped, stream_state=self._stream_state() if saving else None)
        if saving:
            self._state_saved_at = time.perf_counter()
            self._state_save_s = self._state_saved_at - began
        self._count_progress(pl_module, [{k: "" if v is None else str(v) for k, v in row.items()} for row in rows])
        if self.progress:
            for logger in trainer.loggers:
                logger.log_metrics({f"running/{k}": v for k, v in self.progress.items()}, step=len(self._part.batches))

    def _stream_state(self) -> bytes | None:
        """The online methods' state now (after the batch being written), as one safetensors file: the
        ``k``-th online callback's entries prefixed ``k.``."""
        if not self._online:
            return None
        tensors: dict[str, torch.Tensor] = {}
        text: dict[str, str] = {}
        for k, callback in enumerate(self._online):
            state, words = callback.stream_state()
            tensors.update({f"{k}.{name}": value for name, value in state.items()})
            text.update({f"{k}.{name}": value for name, value in words.items()})
        return safetensors_save(tensors, metadata=text)

    def _resume_stream_state(self, done: int) -> None:
        saved = self._part.stream_state
        if saved is None:
            raise RunFolderError(
                f"{self._part.progress} records {done} finished batches but no online methods' state, so "
                f"{', '.join(c.method_name for c in self._online)} cannot continue the stream: write to another "
                "directory, or move this one aside and rerun to start over"
            )
        try:
            tensors = safetensors_load(saved)
            header = int.from_bytes(saved[:8], "little")  # safetensors: header length, JSON header, data
            text = json.loads(saved[8 : 8 + header]).get("__metadata__") or {}
        except Exception as error:  # verified bytes that safetensors cannot read: another format
            raise RunFolderError(
                f"the online methods' state in {self._part.directory} cannot be read ({error}): move the folder "
                "aside and rerun to start over"
            ) from None
        for k, callback in enumerate(self._online):
            prefix = f"{k}."
            callback.resume_stream_state(
                {name.removeprefix(prefix): value for name, value in tensors.items() if name.startswith(prefix)},
                {name.removeprefix(prefix): value for name, value in text.items() if name.startswith(prefix)},
            )

    def _count_progress(self, pl_module: pl.LightningModule, rows: list[dict[str, str]]) -> None:
        for row in rows:
            for name, value in pl_module.progress_values(row).items():
                if value is not None:
                    total = self._progress_sums.setdefault(name, [0.0, 0])
                    total[0] += float(value)
                    total[1] += 1
        self.progress = {name: total / count for name, (total, count) in self._progress_sums.items() if count}

    def _compute_metrics(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, states: list[dict[str, Any]]
    ) -> dict[str, Any]:
        rows = read_rows(self.predictions_path)
        timing = read_rows(self.timing_path)
        ms = [float(r["ms"]) for r in timing]
        adapt_ms = [float(r["adapt_ms"]) for r in timing]
        metrics: dict[str, Any] = {
            "method": _method_name(trainer),
            "model": _model_name(pl_module),
            "data": _data_name(trainer),
            "seed": self.seed if self.seed is not None else seed_in_force(),
        }
        summary = pl_module.summarize_predictions(rows)
        domains = summary.pop("domains")
        metrics.update(summary)
        metrics["ms_per_sample"] = sum(ms) / max(1, len(ms))
        metrics["adapt_ms_per_sample"] = sum(adapt_ms) / max(1, len(adapt_ms))
        metrics["peak_mem_mb"] = max(state["peak_mem_mb"] for state in states)
        metrics["skipped_images"] = sum(state["skipped_images"] for state in states)
        metrics["skipped_image_paths"] = [path for state in states for path in state["skipped_paths"]][:5]
        if self.run_info is not None:
            metrics["run"] = self.run_info
        metrics["key"] = self._run
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
