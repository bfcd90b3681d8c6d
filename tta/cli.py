"""``tta-predict``: compose the Hydra config, instantiate, ``Trainer.predict``, write results.

    tta-predict                                   # the shipped tiny CLIP on every offline-world domain
    tta-predict data.severity=5 seed=1            # any config value
    tta-predict -m data.severity=1,3,5            # a multirun sweep
"""

from __future__ import annotations

import logging
import sys
import warnings
from pathlib import Path
from typing import Any

import hydra
import pytorch_lightning as pl
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from omegaconf import DictConfig, open_dict
from rich.console import Console
from rich.table import Table

from tta.callbacks import PredictionWriter

#: Errors that are the user's to fix: printed as one line, without a stack trace.
USER_ERRORS = (ValueError, FileNotFoundError, KeyError)


def run(cfg: DictConfig, output_dir: str | Path) -> dict[str, Any]:
    """Build everything from ``cfg`` and predict; returns the run's metrics.

    The model is built first and the data set checked next, so a bad name, path or class
    list fails before any long work starts.
    """
    # Lightning's start-up banners (device summary, product tips) drown the table
    logging.getLogger("pytorch_lightning.utilities.rank_zero").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
    pl.seed_everything(cfg.seed, workers=True, verbose=False)
    module = instantiate(cfg.model)
    data_cfg = cfg.data.copy()
    if data_cfg.get("image_size", "absent") is None:
        with open_dict(data_cfg):
            data_cfg.image_size = module.input_size
    datamodule = instantiate(data_cfg)
    callbacks = [instantiate(c) for c in cfg.tta.callbacks.values()]
    writer = PredictionWriter(output_dir, seed=cfg.seed)
    trainer: pl.Trainer = instantiate(cfg.trainer, callbacks=[*callbacks, writer])
    trainer.predict(module, datamodule=datamodule, return_predictions=False)
    return writer.metrics


def metrics_table(metrics: dict[str, Any]) -> Table:
    table = Table(title=f"{metrics['method']} | {metrics['model']} | {metrics['data']} | seed {metrics['seed']}")
    for column in ("domain", "n", "accuracy", "ECE", "ms/sample"):
        table.add_column(column, justify="left" if column == "domain" else "right")

    def row(name: str, m: dict[str, Any]) -> list[str]:
        acc = "-" if m["accuracy"] is None else f"{100 * m['accuracy']:.1f}%"
        ece = "-" if m["ece"] is None else f"{m['ece']:.3f}"
        return [name, str(m["n"]), acc, ece, f"{m['ms_per_sample']:.2f}"]

    for name, m in metrics["domains"].items():
        table.add_row(*row(name, m))
    table.add_section()
    table.add_row(*row("all", metrics))
    table.caption = f"peak memory {metrics['peak_mem_mb']:.0f} MB"
    return table


def _user_error(error: BaseException) -> BaseException | None:
    """The user-facing error inside Hydra's wrappers, if any."""
    while isinstance(error, InstantiationException) and error.__cause__ is not None:
        error = error.__cause__
    return error if isinstance(error, USER_ERRORS) else None


@hydra.main(config_path="pkg://tta.configs", config_name="predict", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    try:
        metrics = run(cfg, HydraConfig.get().runtime.output_dir)
    except (InstantiationException, *USER_ERRORS) as error:
        cause = _user_error(error)
        if cause is None:
            raise
        message = cause.args[0] if isinstance(cause, KeyError) and cause.args else cause
        Console(stderr=True).print(f"[bold red]tta-predict: error:[/] {message}", highlight=False, soft_wrap=True)
        sys.exit(2)
    if cfg.print_table:
        Console().print(metrics_table(metrics))


def predict() -> None:
    """Console-script entry point of ``tta-predict``."""
    _main()
