"""``tta-predict``: compose the Hydra config, instantiate, ``Trainer.predict``, write results.

tta-predict                                   # the shipped tiny CLIP on every offline-world domain
tta-predict data.severity=5 seed=1            # any config value
tta-predict -m data.severity=1,3,5            # a multirun sweep
tta-predict hydra.run.dir=runs/a              # rerun the same command to resume a stopped run

The run directory is locked for the whole run and checked before anything is written in it
(its config record ``.hydra/`` included, which this command writes itself once the check
passed). SIGTERM or SIGINT stops after the current batch, with exit code 143 or 130.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.experimental.callback import Callback
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict
from pytorch_lightning.utilities.rank_zero import rank_zero_only
from rich.console import Console
from rich.table import Table

from tta.callbacks import PredictionWriter, TTAProgressBar
from tta.run_folder import DirectoryLock, RunFolderError, RunStopped, check_run_directory, make_directory, write_atomic

#: Errors that are the user's to fix: printed as one line, without a stack trace.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def run_key(cfg: DictConfig) -> dict[str, Any]:
    """What makes two runs the same run (for resuming): the resolved config, display options aside."""
    config = OmegaConf.to_container(cfg, resolve=True)
    config.pop("print_table", None)
    config.get("trainer", {}).pop("enable_progress_bar", None)
    return config


def check_config(cfg: DictConfig) -> None:
    """Values the config leaves unset (``???``) and a seed that is no integer, as one line each."""
    missing = sorted(OmegaConf.missing_keys(cfg))
    if missing:
        raise ValueError(f"{missing[0]} is not set: add {missing[0]}=<value> to the command")
    if isinstance(cfg.seed, bool) or not isinstance(cfg.seed, int):
        raise ValueError(f"seed must be an integer, got {cfg.seed!r}: set seed=<integer>, e.g. seed=0")


def tta_callbacks(cfg: DictConfig) -> list[pl.Callback]:
    """The TTA callbacks of ``cfg.tta.callbacks``, in order. An entry without ``_target_`` holds
    options of a method that ``tta=`` does not select (an experiment card's settings for its
    method, run with ``tta=none`` for the baseline): it is left out, with a warning."""
    callbacks = []
    for name, node in (cfg.tta.get("callbacks") or {}).items():
        if "_target_" not in node:
            logging.getLogger(__name__).warning(
                "tta.callbacks.%s sets options of a method that tta= does not select; ignored", name
            )
            continue
        callbacks.append(instantiate(node))
    return callbacks


def with_model_preprocessing(data_cfg: DictConfig, preprocessing: dict[str, Any]) -> DictConfig:
    """A copy of the data config whose ``null`` preprocessing settings (``image_size``,
    ``resize_mode``, ``interpolation``) take the model's own values (``module.preprocessing``)."""
    data_cfg = data_cfg.copy()
    with open_dict(data_cfg):
        for key, value in preprocessing.items():
            if data_cfg.get(key, "absent") is None:
                data_cfg[key] = value
    return data_cfg


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any] | None:
    """Build everything from ``cfg`` and predict; returns the run's metrics (``None`` on DDP
    ranks other than 0).

    The model is built first and the data set checked next, so a bad name, path or class
    list fails before any long work starts. If ``output_dir`` holds this run's finished
    batches (a stopped run, same config), prediction resumes after them; a finished run is
    not predicted again.
    """
    check_config(cfg)
    # Lightning's start-up banners (device summary, product tips) drown the table
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    # a resumed run that was finished has no batch left: expected, not a mistake
    warnings.filterwarnings("ignore", message=r"Total length of `DataLoader` across ranks is zero.*")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = instantiate(cfg.model)
    datamodule = instantiate(with_model_preprocessing(cfg.data, module.preprocessing))
    callbacks = tta_callbacks(cfg)
    writer = PredictionWriter(
        output_dir, seed=cfg.seed, run_key=run_key(cfg), run_info={"config": OmegaConf.to_container(cfg, resolve=True)}
    )
    if cfg.trainer.get("enable_progress_bar", True):
        callbacks.append(TTAProgressBar())
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer.metrics


#: How metrics.json values show in the table: percent for accuracies, else by type.
PERCENT_METRICS = ("accuracy",)


def _format(name: str, value: Any) -> str:
    if value is None:
        return "-"
    if name in PERCENT_METRICS:
        return f"{100 * value:.1f}%"
    if isinstance(value, int):
        return str(value)
    return f"{value:.2f}" if name.startswith("ms") else f"{value:.3f}"


def metrics_table(metrics: dict[str, Any]) -> Table:
    """Per domain and overall: the task's metrics (``n``, then e.g. accuracy and ECE), ms per sample."""
    table = Table(title=f"{metrics['method']} | {metrics['model']} | {metrics['data']} | seed {metrics['seed']}")
    names = [k for k, v in next(iter(metrics["domains"].values())).items() if not isinstance(v, (dict, list, str))]
    names = [k for k in names if k != "ms_per_sample"] + ["ms_per_sample"]
    for column in ("domain", *names):
        heading = {"ms_per_sample": "ms/sample", "ece": "ECE"}.get(column, column)
        table.add_column(heading, justify="left" if column == "domain" else "right")
    for name, m in metrics["domains"].items():
        table.add_row(name, *(_format(k, m.get(k)) for k in names))
    table.add_section()
    table.add_row("all", *(_format(k, metrics.get(k)) for k in names))
    table.caption = f"peak memory {metrics['peak_mem_mb']:.0f} MB"
    return table


def _user_error(error: BaseException) -> BaseException | None:
    """The user-facing error inside Hydra's wrappers, if any."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


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
    """Print one line on stderr and exit."""
    Console(stderr=True).print(f"[bold red]tta-predict: {label}[/]{message}", highlight=False, soft_wrap=True)
    sys.exit(exit_code)


@hydra.main(config_path="pkg://tta.configs", config_name="predict", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    output_dir = Path(HydraConfig.get().runtime.output_dir)
    # the processes that Lightning (or SLURM) starts for DDP ranks > 0 run this too: the
    # launching process alone owns the directory and its record
    launching = rank_zero_only.rank == 0
    try:
        check_config(cfg)
        with DirectoryLock(output_dir) if launching else contextlib.nullcontext():
            if launching:
                check_run_directory(output_dir, run_key(cfg))
                write_config_record(output_dir, cfg)
            metrics = run(cfg, output_dir)
    except RunStopped as stop:
        if not launching:
            sys.exit(stop.exit_code)
        _fail(stop, stop.exit_code, label="")
    except KeyboardInterrupt:  # Ctrl-C before the first batch or after the last: nothing half-written
        _fail("stopped by SIGINT; rerun the same command to resume", 130, label="")
    except (InstantiationException, *USER_ERRORS) as error:
        cause = _user_error(error)
        if cause is None:
            raise
        _fail(cause.args[0] if isinstance(cause, KeyError) and cause.args else cause)
    if cfg.print_table and metrics is not None:
        Console().print(metrics_table(metrics))


def predict() -> None:
    """Console-script entry point of ``tta-predict``."""
    _main()
