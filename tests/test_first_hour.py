"""A new user's first hour (issue 18): fast start-up, a light install, every knob findable,
the run saying what it did, tables that fit, stable speed figures, Lightning loggers."""

from __future__ import annotations

import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from conftest import console_script, run_script

from tta.callbacks import PredictionWriter
from tta.cli import default_threads, metrics_tables, render, set_threads
from tta.config_help import GROUPS, describe, method_options
from tta.datamodules import WorldDataModule
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier

HEAVY = ("torch", "pytorch_lightning", "open_clip", "diffusers", "transformers", "timm", "matplotlib")
CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


# --- start-up ---------------------------------------------------------------------------------


def test_importing_the_cli_imports_no_heavy_library():
    done = python(f"import sys, tta.cli; print([m for m in {HEAVY!r} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_report_imports_no_torch():
    done = python(f"import sys, tta.report; print([m for m in {HEAVY[:3]!r} if m in sys.modules])")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "[]"


def test_the_reports_reliability_bins_give_the_metrics_ece():
    import numpy as np
    from torchmetrics.functional.classification import binary_calibration_error

    from tta.metrics.calibration import reliability

    g = np.random.default_rng(0)
    confidence = np.concatenate([g.random(500), np.linspace(0, 14 / 15, 15)])  # inner edges included
    correct = g.random(len(confidence)) < confidence
    expected = binary_calibration_error(torch.tensor(confidence), torch.tensor(correct).long(), n_bins=15, norm="l1")
    assert reliability(confidence, correct).ece == pytest.approx(float(expected), abs=1e-12)


def test_help_and_list_answer_without_importing_torch():
    for flag in ("--help", "list"):
        done = python(
            f"import sys; sys.argv = ['tta-predict', {flag!r}]; from tta.cli import predict; predict(); "
            f"print('heavy:', [m for m in {HEAVY!r} if m in sys.modules])"
        )
        assert done.returncode == 0, done.stderr
        assert "tta.callbacks.tpt.<key>=<value>" in done.stdout and "heavy: []" in done.stdout


# --- every knob findable ----------------------------------------------------------------------


def test_list_names_every_group_option_method_setting_and_card():
    text = describe()
    for group in GROUPS:
        assert f"{group}=" in text
        for path in (CONFIGS / group).glob("*.yaml"):
            assert f"  {path.stem} " in text or f"  {path.stem}\n" in text, (group, path.stem)
    for path in (CONFIGS / "tta").glob("*.yaml"):
        for name, settings in method_options(path):
            assert f"tta.callbacks.{name}.<key>=<value>" in text
            for key, default, _ in settings:
                assert f"{key}={default}" in text, (path.stem, key)
    assert "model.vlm.pretrained=null" in text and "threads=<n>" in text


def test_every_method_option_has_a_one_line_note():
    missing = [
        f"{path.stem}: {name}.{key}"
        for path in sorted((CONFIGS / "tta").glob("*.yaml"))
        for name, settings in method_options(path)
        for key, _, note in settings
        if not note
    ]
    assert not missing, f"options without an inline comment in configs/tta: {missing}"


def test_every_experiment_card_states_its_run_time():
    from tta.config_help import run_time_lines

    missing = [p.stem for p in sorted((CONFIGS / "experiment").glob("*.yaml")) if not run_time_lines(p)]
    assert not missing, f"cards without a 'Run time:' comment line: {missing}"


# --- tables that fit ------------------------------------------------------------------------------


def _metrics(domains: dict[str, dict], **overall) -> dict:
    return {"method": "sts+lame", "model": "tta-world-resnet", "data": "world_groups", "seed": 0,
            "peak_mem_mb": 1234.0, "adapt_ms_per_sample": 12.5, "skipped_images": 3,
            "run": {"torch_threads": 2}, "domains": domains, **overall}  # fmt: skip


@pytest.mark.parametrize(
    "domain_metrics",
    [
        {"n": 500, "accuracy": 0.5, "ece": 0.2, "ms_per_sample": 1234.5678, "adapt_ms_per_sample": 1000.0},
        {
            "n": 300, "text_score": 0.5, "image_score": 0.25, "group_score": 0.125, "group_match": 0.75,
            "text_score_zs": 0.4, "image_score_zs": 0.2, "group_score_zs": 0.1, "group_match_zs": 0.7,
            "ms_per_sample": 99999.9, "adapt_ms_per_sample": 99000.0,
        },
        {
            "n": 200, "found_fraction": 0.3, "found_fraction_zs": 0.25, "steps_first": 12.5,
            "steps_first_zs": 14.0, "ms_per_sample": 208873.96, "adapt_ms_per_sample": 195840.5,
        },
    ],
    ids=["classification", "groups", "search"],
)  # fmt: skip
def test_printed_tables_fit_80_columns_without_cutting_cells(domain_metrics):
    names = ["clean", "noise@1+texture@1", "a-much-longer-domain-name-of-a-folder"]
    metrics = _metrics({name: dict(domain_metrics) for name in names}, **domain_metrics)
    text = render(metrics_tables(metrics))
    assert max(len(line) for line in text.splitlines()) <= 80, text
    assert "…" not in text, text
    assert "ms/sample" in text and "adapt ms" in text and "3 undecodable images skipped" in text
    if "text_score_zs" in domain_metrics:
        assert "unadapted (raw)" in text and "40.0%" in text  # the raw scores get their own table


# --- the run says what happened -----------------------------------------------------------------


@pytest.fixture(scope="module")
def quick_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("first_hour") / "run"
    args = ["data.domains=[clean]", "data.n_per_domain=6", "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]
    first = run_script("tta-predict", args, cwd=out.parent)
    again = run_script("tta-predict", args, cwd=out.parent)
    return out, first, again


def test_run_prints_its_directory_and_the_files_it_wrote(quick_run):
    out, first, _ = quick_run
    assert first.returncode == 0, first.stderr
    lines = first.stdout.splitlines()
    assert lines[0] == f"run directory: {out}"
    assert f"wrote cli.log, metrics.json, predictions.csv, progress.json, timing.csv in {out}" in lines[-1]
    assert "torch CPU threads: " in first.stdout


def test_cli_log_holds_the_runs_log(quick_run):
    out, _, again = quick_run
    log = (out / "cli.log").read_text()
    assert f"run directory: {out}" in log and "accuracy" in log and "wrote cli.log" in log
    assert "already finished (1 batches); metrics recomputed from its rows" in again.stdout
    assert log.count("run directory:") == 2  # both runs, appended


def test_a_resumed_run_says_where_it_resumes(tmp_path, caplog):
    class StopAfterOneBatch(pl.Callback):  # no constructor settings: the same run key when disarmed
        armed = False

        def on_predict_batch_end(self, trainer, *args, **kwargs):
            if self.armed and trainer.predict_loop.batch_progress.current.completed >= 1:
                raise RuntimeError("stopped")

    def run(armed):
        stop = StopAfterOneBatch()
        stop.armed = armed
        vlm = create_vlm("tta-world-resnet")
        data = WorldDataModule(domains=["clean"], n_per_domain=30, batch_size=8)
        trainer = pl.Trainer(logger=False, callbacks=[stop, PredictionWriter(tmp_path, seed=0)],
                             enable_progress_bar=False, enable_model_summary=False)  # fmt: skip
        trainer.predict(ZeroShotClassifier(vlm), datamodule=data, return_predictions=False)

    with pytest.raises(RuntimeError, match="stopped"):
        run(armed=True)  # batch 0's rows are written when batch 1 starts; batch 1's are lost
    with caplog.at_level("INFO", logger="tta"):
        run(armed=False)
    assert "resuming after batch 1 of 4" in caplog.text, caplog.text


# --- threads ------------------------------------------------------------------------------------


def test_thread_count_comes_from_the_config_the_environment_or_the_default(compose, monkeypatch):
    before = torch.get_num_threads()
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        assert set_threads(compose(["threads=1"])).startswith("1 (threads=1)") and torch.get_num_threads() == 1
        assert set_threads(compose()) == f"{default_threads()} (default; set threads=<n> to change)"
        monkeypatch.setenv("OMP_NUM_THREADS", "1")
        torch.set_num_threads(1)
        assert set_threads(compose()) == "1 (OMP_NUM_THREADS)"
        with pytest.raises(ValueError, match="threads must be >= 1"):
            set_threads(compose(["threads=0"]))
    finally:
        torch.set_num_threads(before)


def test_metrics_record_the_thread_count(quick_run):
    out, _, _ = quick_run
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["run"]["torch_threads"] >= 1


# --- errors a new user meets ----------------------------------------------------------------------


def test_a_gpu_trainer_without_a_gpu_is_one_line(compose):
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    from tta.cli import check_accelerator

    with pytest.raises(ValueError, match="no CUDA GPU.*run without trainer=gpu"):
        check_accelerator(compose(["trainer=gpu"]))


def test_difftpt_without_its_extra_names_the_extra(monkeypatch):
    from tta.augment import DiffusionViewGenerator

    monkeypatch.setitem(sys.modules, "diffusers", None)  # import diffusers now raises ImportError
    with pytest.raises(ImportError, match=r"pip install 'tta\[difftpt\]'"):
        DiffusionViewGenerator(pretrained="tta-tiny-image-variation", cache_dir=None)


def test_the_cli_reports_an_import_error_as_one_line():
    from tta.cli import _user_error

    error = ImportError("DiffTPT needs diffusers and transformers: pip install 'tta[difftpt]'")
    assert _user_error(error) is error


# --- Lightning loggers ------------------------------------------------------------------------------


def _logger_run(tmp_path: Path, logger: str) -> Path:
    out = tmp_path / logger
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | {"OMP_NUM_THREADS": "1"}
    args = [f"logger={logger}", "data.domains=[clean,blur]", "data.n_per_domain=8", "data.batch_size=4",
            "trainer.enable_progress_bar=false", f"hydra.run.dir={out}"]  # fmt: skip
    done = subprocess.run(
        [str(console_script("tta-predict")), *args], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return out


def test_csv_logger_gets_the_config_running_accuracy_and_per_domain_metrics(tmp_path):
    out = _logger_run(tmp_path, "csv")
    (version,) = (out / "lightning_logs").iterdir()
    hparams = (version / "hparams.yaml").read_text()
    assert "seed: 0" in hparams and "n_per_domain: 8" in hparams
    with open(version / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    metrics = json.loads((out / "metrics.json").read_text())
    running = [float(r["running/acc"]) for r in rows if r.get("running/acc")]
    assert len(running) == 4 and running[-1] == pytest.approx(metrics["accuracy"])
    final = next(r for r in rows if r.get("all/accuracy"))
    assert float(final["all/accuracy"]) == pytest.approx(metrics["accuracy"])
    assert float(final["blur/accuracy"]) == pytest.approx(metrics["domains"]["blur"]["accuracy"])


def test_tensorboard_logger_gets_the_metrics(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out = _logger_run(tmp_path, "tensorboard")
    (version,) = (out / "lightning_logs").iterdir()
    events = EventAccumulator(str(version))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"running/acc", "all/accuracy", "clean/accuracy", "blur/ece"} <= tags
    metrics = json.loads((out / "metrics.json").read_text())
    assert events.Scalars("all/accuracy")[-1].value == pytest.approx(metrics["accuracy"], abs=1e-6)


def test_mlflow_logger_writes_a_local_store(tmp_path):
    pytest.importorskip("mlflow")
    out = _logger_run(tmp_path, "mlflow")
    metric_files = {p.name for p in (out / "mlruns").rglob("metrics/*/*")} | {
        p.name for p in (out / "mlruns").rglob("metrics/*")
    }
    assert {"accuracy", "acc"} <= metric_files, metric_files


def test_wandb_logger_composes(compose):
    cfg = compose(["logger=wandb"])
    assert cfg.logger._target_ == "pytorch_lightning.loggers.WandbLogger" and cfg.logger.offline is True


def test_readme_is_a_front_page_whose_links_resolve():
    """Under 200 lines; every relative link (docs/, benchmarks/) names a file in the repository."""
    import re

    root = Path(__file__).resolve().parents[1]
    readme = (root / "README.md").read_text()
    assert len(readme.splitlines()) < 200
    links = re.findall(r"\]\(((?:docs|benchmarks)/[^)#]+)", readme)
    assert links and all((root / link).is_file() for link in links), [x for x in links if not (root / x).is_file()]
