"""``tta-predict``: compose the Hydra config, instantiate, ``Trainer.predict``, write results.

    tta-predict                                   # the shipped tiny CLIP on every offline-world domain
    tta-predict data.severity=5 seed=1            # any config value
    tta-predict -m data.severity=1,3,5            # a multirun sweep
    tta-predict hydra.run.dir=runs/a              # rerun the same command to resume a stopped run
    tta-predict list                              # config groups, every method's options, the cards

The run directory is locked for the whole run and checked before anything is written in it
(its config record ``.hydra/`` and ``cli.log`` included, which are written once the check
passed): first against the config, then, once the model and data are built, against the
fingerprints of the weights and the data files too. SIGTERM or SIGINT stops after the current
batch (exit code 143 or 130) and prints the command that resumes the run; at any other moment
it stops at once, with one line.

Start-up is kept short: this module imports only Hydra, OmegaConf and the standard library;
torch, Lightning and open_clip are imported by :func:`run`, after the config is composed and
checked (so ``--help``, ``list`` and a config error answer in about a second).
"""

from __future__ import annotations

import contextlib
import ctypes
import importlib
import io
import logging
import math
import os
import re
import shlex
import signal
import sys
import threading
import time
import warnings
from pathlib import Path
from typing import TYPE_CHECKING, Any

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from tta.run_folder import (
    DirectoryLock,
    Interrupted,
    RunFolderError,
    RunStopped,
    check_run_directory,
    drop_display_options,
    finished_batches,
    make_directory,
    raise_on_stop_signals,
    write_atomic,
)
from tta.status import SlowStep
from tta.validation import OptionError

if TYPE_CHECKING:
    import pytorch_lightning as pl
    from rich.table import Table

#: Errors that are the user's to fix: printed as one line, without a stack trace.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError, ImportError)

#: The run's log: printed, and written to ``cli.log`` in the run directory (configs/predict.yaml).
log = logging.getLogger("tta.cli")


def run_key(cfg: DictConfig) -> dict[str, Any]:
    """What makes two runs the same run (for resuming): the resolved config, display options
    and loggers aside (where results are also logged does not change them)."""
    return drop_display_options(OmegaConf.to_container(cfg, resolve=True))


def check_config(cfg: DictConfig) -> None:
    """Values the config leaves unset (``???``), a seed that is no integer and numbers that are
    not finite (``lr=nan``, ``lr=inf``: no option of ours takes them), as one line each, before
    anything is built."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]} is not set: add {missing[0]}=<value> to the command")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}: set seed=<integer>, e.g. seed=0")
    for key, value in _numbers(OmegaConf.to_container(cfg, resolve=True)):
        if not math.isfinite(value):
            raise OptionError(key, f"must be a finite number, got {value}: give it a finite value")


def _numbers(node: Any, prefix: str = "") -> list[tuple[str, float]]:
    """``(dotted key, value)`` of every float in a plain config."""
    if isinstance(node, dict):
        return [found for key, value in node.items() for found in _numbers(value, f"{prefix}{key}.")]
    if isinstance(node, list):
        return [found for k, value in enumerate(node) for found in _numbers(value, f"{prefix.rstrip('.')}[{k}].")]
    return [(prefix.rstrip("."), node)] if isinstance(node, float) else []


def _instantiate(node: DictConfig, where: str, **kwargs: Any) -> Any:
    """``instantiate(node)``, a bad option's error naming it from where it lives in the config
    (``where``, e.g. ``tta.callbacks.tpt``, or the nested object's key that Hydra reports)."""
    try:
        return instantiate(node, **kwargs)
    except InstantiationException as error:
        cause = _user_error(error)
        if isinstance(cause, OptionError):
            nested = re.search(r"full_key: (\S+)", str(error))
            raise cause.within(nested.group(1) if nested else where) from None
        raise
    except OptionError as error:
        raise error.within(where) from None


def tta_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The TTA callbacks of ``cfg.tta.callbacks``, in order. An entry without ``_target_`` holds
    options of a method that ``tta=`` does not select (an experiment card's settings for its
    method, run with ``tta=none`` for the baseline): it is left out, with a warning."""
    callbacks = []
    for name, node in (cfg.tta.get("callbacks") or {}).items():
        if "_target_" not in node:
            log.warning("tta.callbacks.%s sets options of a method that tta= does not select; ignored", name)
            continue
        callbacks.append(_instantiate(node, f"tta.callbacks.{name}"))
    return callbacks


def set_threads(cfg: DictConfig) -> str:
    """Set torch's CPU thread count and say how it was chosen: ``threads`` from the config,
    else ``OMP_NUM_THREADS`` from the environment, else :func:`default_threads`. Under DDP
    Lightning gives each process its share itself."""
    import torch

    if str(cfg.trainer.get("strategy", "")).startswith("ddp"):
        return f"{torch.get_num_threads()} (Lightning sets each DDP process's share)"
    if cfg.get("threads") is not None:
        if int(cfg.threads) < 1:
            raise ValueError(f"threads must be >= 1, got {cfg.threads}: set threads=<n> or leave it null")
        torch.set_num_threads(int(cfg.threads))
        return f"{torch.get_num_threads()} (threads={cfg.threads})"
    if os.environ.get("OMP_NUM_THREADS"):
        return f"{torch.get_num_threads()} (OMP_NUM_THREADS)"
    torch.set_num_threads(default_threads())
    return f"{torch.get_num_threads()} (default; set threads=<n> to change)"


def default_threads() -> int:
    """The cores this process may run on, at most 8: per-sample adaptation of small batches
    gains little from more, and a busy machine loses much to oversubscribed threads."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(1, min(8, cores))


def with_model_preprocessing(data_cfg: DictConfig, preprocessing: dict[str, Any]) -> DictConfig:
    """A copy of the data config whose ``null`` preprocessing settings (``image_size``,
    ``resize_mode``, ``interpolation``) take the model's own values (``module.preprocessing``)."""
    data_cfg = data_cfg.copy()
    with open_dict(data_cfg):
        for key, value in preprocessing.items():
            if data_cfg.get(key, "absent") is None:
                data_cfg[key] = value
    return data_cfg


def run(cfg: DictConfig, output_dir: str | Path, launching: bool = True) -> dict[str, Any] | None:
    """Build everything from ``cfg`` and predict; returns the run's metrics (``None`` on DDP
    ranks other than 0).

    The model is built first and the data set checked next, so a bad name, path or class
    list fails before any long work starts. Then the run directory is checked against the whole
    run key (the config, and the fingerprints of the weights and the data files) and, in the
    ``launching`` process, the config record is written and ``cli.log`` starts. If
    ``output_dir`` holds this run's finished batches (a stopped run, same key), prediction
    resumes after them; a finished run is not predicted again.
    """
    check_config(cfg)
    with SlowStep("loading torch, Lightning and open_clip"):
        import pytorch_lightning as pl
        import torch

        from tta.callbacks import OnlineTTA, PredictionWriter, TTAProgressBar
        from tta.callbacks.writer import run_inputs

    # Lightning's start-up banners (device summary, product tips) drown the table
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # a resumed run that was finished has no batch left: expected, not a mistake
    warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero.*")
    threads = set_threads(cfg)
    log.info("torch CPU threads: %s", threads)
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    check_accelerator(cfg)
    check_logger_package(cfg)
    with SlowStep(f"building the model ({_choice('model')})"):
        module = _instantiate(cfg.model, "model")
    with SlowStep(f"reading the data set ({_choice('data')})"):
        datamodule = _instantiate(with_model_preprocessing(cfg.data, module.preprocessing), "data")
    if hasattr(module, "check_datamodule"):  # e.g. class names in another order than the data's
        module.check_datamodule(datamodule)
    callbacks = tta_callbacks(cfg)
    online = [callback for callback in callbacks if isinstance(callback, OnlineTTA)]
    if online:  # before DDP's processes are launched: a trainer that is never run tells how many there would be
        world_size = instantiate(cfg.trainer, logger=False, enable_progress_bar=False).world_size
        online[0].check_one_process(world_size)
    with SlowStep("fingerprinting the model's weights and the data's files"):
        key = run_key(cfg) | {"inputs": run_inputs(module, datamodule)}
    if launching:
        check_run_directory(output_dir, key)
        if HydraConfig.initialized():  # tta-predict (run() from Python has no Hydra record to write)
            write_config_record(Path(output_dir), cfg)
        RunLog.accept_all()
    run_info = {"config": OmegaConf.to_container(cfg, resolve=True), "torch_threads": torch.get_num_threads()}
    writer = PredictionWriter(output_dir, seed=cfg.seed, run_key=key, run_info=run_info)
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TTAProgressBar())
    logger = instantiate(cfg.logger) if cfg.get("logger") else False
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, writer], logger=logger)
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer.metrics


def _choice(group: str) -> str:
    """The option chosen for a config group (``tta_world_resnet``), or the group's name outside a Hydra run."""
    with contextlib.suppress(ValueError, KeyError):
        return str(HydraConfig.get().runtime.choices[group])
    return group


#: The packages each logger option can use (one suffices), and how to install them.
LOGGER_PACKAGES = {
    "tensorboard": (("tensorboard", "tensorboardX"), "pip install 'tta[loggers]'"),
    "mlflow": (("mlflow",), "pip install 'tta[loggers]'"),
    "wandb": (("wandb",), "pip install wandb"),
}


def check_logger_package(cfg: DictConfig) -> None:
    """A logger whose package is missing: one line naming what to install, before any long work
    (the logger itself is built once the run directory is accepted: MLflow's creates its store)."""
    choice = _choice("logger")
    if not cfg.get("logger") or choice not in LOGGER_PACKAGES:
        return
    packages, install = LOGGER_PACKAGES[choice]
    for package in packages:
        try:
            importlib.import_module(package)
            return
        except ImportError:
            continue
    raise ImportError(f"logger={choice} needs the package {packages[0]}, which is not installed: {install}")


def check_accelerator(cfg: DictConfig) -> None:
    """A GPU trainer on a machine without one: one line with the fix, before the model is built."""
    import torch

    accelerator = str(cfg.trainer.get("accelerator", "auto"))
    if accelerator in ("gpu", "cuda") and not torch.cuda.is_available():
        raise ValueError(
            f"trainer.accelerator={accelerator} but this machine has no CUDA GPU "
            f"(torch {torch.__version__}, CUDA build {torch.version.cuda}): run without trainer=gpu "
            "(the default trainer runs on the CPU), or install a CUDA build of torch on a GPU machine"
        )


# --- the results table -----------------------------------------------------------------------

#: How a metric is headed in the printed table (short, so that the table fits 80 columns).
HEADINGS = {
    "accuracy": "accuracy",
    "ece": "ECE",
    "text_score": "text",
    "image_score": "image",
    "group_score": "group",
    "group_match": "match",
    "multiple_choice": "choice",
    "found_fraction": "found",
    "steps_first": "1st step",
}
#: Metrics shown in percent.
PERCENT_METRICS = {"accuracy", "text_score", "image_score", "group_score", "group_match", "found_fraction"}
TABLE_WIDTH = 80


def _format(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in PERCENT_METRICS:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if name.startswith(("ms", "adapt", "steps")) else f"{value:.3f}"


def _metric_names(metrics: dict[str, Any]) -> list[str]:
    """The task's per-domain metrics in declaration order (``n`` first, times and ``*_zs`` apart)."""
    first = next(iter(metrics["domains"].values()))
    names = [k for k, v in first.items() if isinstance(v, (int, float)) or v is None]
    return [k for k in names if not k.endswith("_zs") and k not in ("ms_per_sample", "adapt_ms_per_sample")]


def metrics_tables(metrics: dict[str, Any]) -> list[Table]:
    """The results as rich tables that fit 80 columns: per domain and overall, the task's
    metrics, ms per sample (the whole loop, adaptation included) and, when a method ran, the
    part of it spent adapting; for tasks that keep unadapted scores (``*_zs``), a second table
    of those."""
    from rich import box
    from rich.table import Table

    names = _metric_names(metrics)
    adapted = bool(metrics.get("adapt_ms_per_sample"))
    tables = []
    raw = [n for n in names if n != "n" and any(f"{n}_zs" in d for d in metrics["domains"].values())]
    for suffix, columns in (("", names), ("_zs", ["n", *raw])):
        if suffix and not raw:
            continue
        title = f"{metrics['method']} | {metrics['model']} | {metrics['data']} | seed {metrics['seed']}"
        table = Table(title=title if not suffix else "unadapted (raw) scores of the same run", box=box.SQUARE)
        table.add_column("domain", overflow="fold", max_width=24)
        heads = [(c, c if c == "n" else c + suffix) for c in columns]
        for column, _ in heads:
            table.add_column(HEADINGS.get(column, column), justify="right", overflow="fold")
        times = [] if suffix else ["ms_per_sample", *(["adapt_ms_per_sample"] if adapted else [])]
        for column in times:
            table.add_column({"ms_per_sample": "ms/sample", "adapt_ms_per_sample": "adapt ms"}[column], justify="right")
        for name, m in metrics["domains"].items():
            table.add_row(name, *(_format(c, m.get(key)) for c, key in heads), *(_format(t, m.get(t)) for t in times))
        table.add_section()
        table.add_row(
            "all", *(_format(c, metrics.get(key)) for c, key in heads), *(_format(t, metrics.get(t)) for t in times)
        )
        if not suffix:
            caption = [f"peak memory {metrics['peak_mem_mb']:.0f} MB"]
            threads = metrics.get("run", {}).get("torch_threads")
            if threads:
                caption.append(f"{threads} CPU threads")
            if metrics.get("skipped_images"):
                caption.append(f"{metrics['skipped_images']} undecodable images skipped")
            table.caption = ", ".join(caption)
        tables.append(table)
    return tables


def render(tables: list[Table], width: int = TABLE_WIDTH) -> str:
    """Plain text of the tables at ``width`` columns (no colour codes: the same in a terminal and a log)."""
    from rich.console import Console

    console = Console(width=width, file=io.StringIO(), color_system=None, force_terminal=False, highlight=False)
    for table in tables:
        console.print(table)
    return console.file.getvalue().rstrip("\n")


# --- errors ------------------------------------------------------------------------------------


def _user_error(error: BaseException) -> BaseException | None:
    """The user-facing error inside Hydra's wrappers, if any."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


class RunLog(logging.FileHandler):
    """``cli.log``: the run's log lines, held back until the run directory is accepted
    (:meth:`accept_all`, once the run key is checked), so that a refused run writes no log into
    a folder it does not own. Until then the lines only reach the terminal; a refused run drops
    them here (configs/predict.yaml names this class for Hydra's ``file`` log handler)."""

    def __init__(self, filename: str, mode: str = "a", encoding: str | None = None, delay: bool = True) -> None:
        super().__init__(filename, mode, encoding, delay=True)
        self._held: list[logging.LogRecord] | None = []

    def emit(self, record: logging.LogRecord) -> None:
        if self._held is not None:
            self._held.append(record)
        else:
            super().emit(record)

    def accept(self) -> None:
        held, self._held = self._held, None
        for record in held or []:
            super().emit(record)

    def write_line(self, message: str, level: int = logging.ERROR) -> None:
        """A line that did not go through logging (the closing error), if the log is accepted."""
        if self._held is None:
            super().emit(logging.LogRecord(log.name, level, __file__, 0, message, None, None))

    @staticmethod
    def instances() -> list[RunLog]:
        return [h for h in logging.getLogger().handlers if isinstance(h, RunLog)]

    @classmethod
    def accept_all(cls) -> None:
        for handler in cls.instances():
            handler.accept()


def _shown_path(path: str | Path) -> str:
    """``path`` relative to the working directory when it lies under it (shorter to read and retype)."""
    relative = os.path.relpath(os.path.abspath(path))
    return relative if not relative.startswith("..") else str(path)


def resume_command() -> str:
    """The command that resumes this run: the user's command line with the run (or, in a sweep,
    the sweep) directory set to this one, so that a timestamped default directory is reused."""
    hydra_cfg = HydraConfig.get()
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    setting = "hydra.sweep.dir" if multirun else "hydra.run.dir"
    directory = hydra_cfg.sweep.dir if multirun else hydra_cfg.runtime.output_dir
    args = [a for a in sys.argv[1:] if not a.startswith(("hydra.run.dir=", "hydra.sweep.dir="))]
    return shlex.join(["tta-predict", *args, f"{setting}={_shown_path(directory)}"])


def stopped_message(received: signal.Signals, output_dir: Path | None, done: int | None = None, total: int = 0) -> str:
    """The one line a stop signal ends the run with: what was kept and the command that resumes it."""
    if output_dir is None:
        return f"stopped by {received.name} during start-up; nothing was written"
    if (output_dir / "metrics.json").is_file() and done is None:
        return f"stopped by {received.name} after the run had finished; its results are in {_shown_path(output_dir)}"
    kept = (finished_batches(output_dir) or 0) if done is None else done
    if total:
        where = f"after batch {kept} of {total}"
    elif kept:
        where = f"with {kept} finished batches kept"
    else:
        where = "before any batch was finished"
    return f"stopped by {received.name} {where}; resume with: {resume_command()}"


#: Linux's prctl option: the signal a process gets when its parent dies.
PR_SET_PDEATHSIG = 1


def stop_with_launching_process(grace_s: float = 30.0) -> None:
    """In a DDP process that Lightning started (rank > 0): when the process that started it dies,
    however it dies (``kill -9`` included), stop too: SIGTERM to itself, which ends the run after
    the current batch; if it is stuck in a collective with the dead process, exit ``grace_s``
    later. Without this it would run on alone and hold its part of the run directory. On Linux
    the kernel sends the SIGTERM at once (``PR_SET_PDEATHSIG``); a thread that watches the parent
    process sends it elsewhere and ends a stuck process."""
    parent = os.getppid()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, int(signal.SIGTERM))

    def watch() -> None:
        while os.getppid() == parent and parent != 1:  # 1: the parent died before this process looked
            time.sleep(0.1)
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(143)

    threading.Thread(target=watch, name="tta-watch-launching-process", daemon=True).start()


def write_config_record(output_dir: Path, cfg: DictConfig) -> None:
    """``.hydra/config.yaml``, ``hydra.yaml`` and ``overrides.yaml``, as Hydra writes them, written
    here (``hydra.output_subdir`` is null) so that a refused run leaves the folder's record alone."""
    hydra_cfg = HydraConfig.instance().cfg
    record = output_dir / ".hydra"
    make_directory(record)
    for name, node in (
        ("config.yaml", cfg),
        ("hydra.yaml", hydra_cfg),
        ("overrides.yaml", hydra_cfg.hydra.overrides.task),
    ):
        write_atomic(record / name, OmegaConf.to_yaml(node))


class RunDirectoryCheck(Callback):
    """Hydra callback: the run (or sweep) directory can be created and written, checked before
    Hydra creates it, so that a path under a file or in a read-only place is one line, exit 2."""

    def on_run_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.run.dir, "hydra.run.dir")

    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        self._check(config.hydra.sweep.dir, "hydra.sweep.dir")

    @staticmethod
    def _check(directory: str, setting: str) -> None:
        try:
            make_directory(Path(directory))
        except RunFolderError as error:
            _fail(f"{error} ({setting})")


def _fail(message: Any, exit_code: int = 2, label: str = "error: ") -> None:
    """Print one line on stderr (and into ``cli.log`` once the run owns it) and exit."""
    from rich.console import Console
    from rich.markup import escape

    for handler in RunLog.instances():
        handler.write_line(f"tta-predict: {label}{message}")
    Console(stderr=True).print(
        f"[bold red]tta-predict: {label}[/]{escape(str(message))}", highlight=False, soft_wrap=True
    )
    sys.exit(exit_code)


def _launching_process() -> bool:
    """Whether this is the process the user started, not a DDP rank > 0 that Lightning (or
    SLURM) started: the rank variables Lightning reads, without importing it (start-up time)."""
    for key in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK"):
        if os.environ.get(key) is not None:
            return int(os.environ[key]) == 0
    return True


@hydra.main(config_path="pkg://tta.configs", config_name="predict", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    # the processes that Lightning (or SLURM) starts for DDP ranks > 0 run this too: the
    # launching process alone owns the directory and its record, and reports
    launching = _launching_process()
    if not launching:
        stop_with_launching_process()
    try:
        check_config(cfg)
        with DirectoryLock(output_dir) if launching else contextlib.nullcontext():
            if launching:
                # the config part of the run key now, the fingerprints once the model and data are built
                check_run_directory(output_dir, run_key(cfg), unchecked=("inputs",))
                log.info("run directory: %s", output_dir)
            metrics = run(cfg, output_dir, launching)
    except (RunStopped, Interrupted) as stop:
        if not launching:  # the launching process reports the stop; 0 keeps Lightning's observer from killing it
            sys.exit(0)
        done = (stop.done, stop.total) if isinstance(stop, RunStopped) else ()
        _fail(stopped_message(stop.received, output_dir, *done), stop.exit_code, label="")
    except (InstantiationException, *USER_ERRORS) as error:
        cause = _user_error(error)
        if cause is None:
            raise
        message = cause.args[0] if isinstance(cause, KeyError) and cause.args else str(cause)
        if getattr(cause, "resumable", False):
            message += f"; resume with: {resume_command()}"
        _fail(message)
    if metrics is None:  # a DDP rank other than 0: rank 0 reports
        return
    if cfg.print_table:
        log.info("results:\n%s", render(metrics_tables(metrics)))
    # the lock is the run's, not a result
    written = sorted(p.name for p in output_dir.iterdir() if p.is_file() and p.name[0] != "." and p.name != "run.lock")
    log.info("wrote %s in %s", ", ".join(written), output_dir)


def predict() -> None:
    """Console-script entry point of ``tta-predict`` (``list`` or ``--help``: every knob, see
    :mod:`tta.config_help`). From here on SIGINT and SIGTERM end the command with one line
    (after the current batch once batches run)."""
    raise_on_stop_signals()
    try:
        if sys.argv[1:2] == ["list"] or {"-h", "--help"} & set(sys.argv[1:]):
            from tta.config_help import describe

            with contextlib.suppress(BrokenPipeError):  # tta-predict list | head
                print(describe())
            return
        from tta.overrides import check_overrides

        # a mistyped key, answered with the closest keys before Hydra's own advice (append it with +)
        message = check_overrides(sys.argv[1:]) if _launching_process() else None
        if message:
            _fail(message)
        _main()
    except Interrupted as stop:  # before Hydra made a run directory
        _fail(stopped_message(stop.received, None), stop.exit_code, label="")
