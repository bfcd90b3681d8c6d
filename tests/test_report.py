"""``tta-report``: runs grouped by their whole configuration with the differing settings named, a
printed table that fits 80 columns, a closed pipe, a damaged ``predictions.csv``. Each test runs
the command (``tta.report.main`` or the console script) on metrics files written here."""

from __future__ import annotations

import copy
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from conftest import console_script, run_script

from tta.report import main

DOMAINS = ("clean", "noise", "blur", "contrast", "sketch", "texture", "hue")
PREDICTIONS_HEADER = "index,domain,label,pred,confidence,pred_zs,confidence_zs"


def resolved_config(*, seed: int = 0, severity: int = 3, data_seed: int = 10000, tta: dict | None = None) -> dict:
    """A resolved ``tta-predict`` config as ``metrics.json`` records it under ``run.config`` (shortened)."""
    return {
        "model": {
            "_target_": "tta.tasks.ZeroShotClassifier",
            "vlm": {"_target_": "tta.models.create_vlm", "name": "tta-world-resnet", "pretrained": None},
            "templates": ["a photo of a {}."],
        },
        "data": {
            "_target_": "tta.datamodules.WorldDataModule",
            "domains": "all",
            "severity": severity,
            "n_per_domain": 20,
            "seed": data_seed,
            "stream": "iid",
        },
        "tta": {"callbacks": tta or {}},
        "trainer": {"_target_": "pytorch_lightning.Trainer", "precision": "32-true", "enable_progress_bar": True},
        "logger": {},
        "seed": seed,
        "print_table": True,
        "threads": None,
    }


def tpt(lr: float) -> dict:
    return {"tpt": {"_target_": "tta.callbacks.TPT", "lr": lr, "steps": 1, "n_views": 64}}


def run_key(config: dict, weights: str) -> dict:
    """The run key tta-predict records: the config without its display options, with the inputs."""
    key = copy.deepcopy(config)
    del key["print_table"], key["logger"], key["trainer"]["enable_progress_bar"]
    return key | {"inputs": {"weights": weights, "data": None}}


def write_run(
    directory: Path,
    config: dict,
    accuracy: float,
    *,
    method: str | None = None,
    with_key: bool = True,
    weights: str = "sha256:0123456789abcdef",
) -> Path:
    """A finished run's ``metrics.json`` in ``directory`` (one score on every domain)."""
    directory.mkdir(parents=True)
    metrics: dict[str, Any] = {
        "method": method or "+".join(config["tta"]["callbacks"]) or "none",
        "model": "tta-world-resnet",
        "data": "world",
        "seed": config["seed"],
        "n": 20 * len(DOMAINS),
        "accuracy": accuracy,
        "ece": 0.1,
        "ms_per_sample": 1.0,
        "adapt_ms_per_sample": 0.5,
        "peak_mem_mb": 100.0,
        "skipped_images": 0,
        "skipped_image_paths": [],
        "run": {"config": config, "torch_threads": 2},
        **({"key": run_key(config, weights)} if with_key else {}),
        "domains": {name: {"n": 20, "accuracy": accuracy, "ece": 0.1} for name in DOMAINS},
    }
    (directory / "metrics.json").write_text(json.dumps(metrics))
    return directory


def table_rows(report: str, method: str) -> list[str]:
    return [line for line in report.splitlines() if line.startswith(f"| {method} |")]


def test_two_learning_rates_are_two_rows_and_the_rate_is_named(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    write_run(sweep / "0", resolved_config(seed=0), 0.5)
    for k, (lr, seed, accuracy) in enumerate(((1e-3, 0, 0.5), (1e-3, 1, 0.6), (5e-3, 0, 0.7), (5e-3, 1, 0.9))):
        write_run(sweep / str(k + 1), resolved_config(seed=seed, tta=tpt(lr)), accuracy)
    main([str(sweep)])
    report = (sweep / "report.md").read_text()
    rows = table_rows(report, "tpt")
    assert len(rows) == 2, report
    assert "tta.callbacks.tpt.lr=0.001" in rows[0] and "55.0 ± 7.1" in rows[0]
    assert "tta.callbacks.tpt.lr=0.005" in rows[1] and "80.0 ± 14.1" in rows[1]
    assert "tta.callbacks.tpt.lr=<unset>" in table_rows(report, "none")[0]  # the zero-shot run has no TPT
    assert "\nRows differ in: tta.callbacks.tpt, tta.callbacks.tpt.lr\n" in report
    printed = capsys.readouterr().out
    assert "tpt.lr=0.001" in printed and "tpt.lr=0.005" in printed
    assert "Rows differ in: tta.callbacks.tpt, tta.callbacks.tpt.lr" in printed


def test_run_seeds_are_pooled_and_data_seeds_are_not(tmp_path, capsys):
    """The run seed (``seed``, and ``seed_in_force`` of a run from Python) makes replicates;
    ``data.seed`` draws other scenes: other data, another row."""
    for seed, accuracy in ((0, 0.5), (1, 0.6), (2, 0.7)):
        run = write_run(tmp_path / str(seed), resolved_config(seed=seed), accuracy)
        metrics = json.loads((run / "metrics.json").read_text())
        metrics["key"]["seed_in_force"] = seed
        (run / "metrics.json").write_text(json.dumps(metrics))
    write_run(tmp_path / "3_other_scenes", resolved_config(data_seed=7), 0.2)
    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    rows = table_rows(report, "none")
    assert len(rows) == 2, report
    assert "data.seed=10000" in rows[0] and "| 3 |" in rows[0] and "60.0 ± 10.0" in rows[0]
    assert "data.seed=7" in rows[1] and "| 1 |" in rows[1] and "± " not in rows[1]
    assert "\nRows differ in: data.seed\n" in report
    assert "60.0 ± 10.0" in capsys.readouterr().out


def test_old_runs_without_a_key_are_grouped_by_their_config(tmp_path):
    """Older tta-predict runs record no ``key``: their resolved config (``run.config``) groups
    them, its seed and display options (``print_table``, progress bar) aside."""
    for k, (lr, seed, accuracy) in enumerate(((1e-3, 0, 0.5), (1e-3, 1, 0.6), (5e-3, 0, 0.7))):
        config = resolved_config(seed=seed, tta=tpt(lr))
        config["print_table"] = seed == 0
        config["trainer"]["enable_progress_bar"] = seed == 1
        write_run(tmp_path / str(k), config, accuracy, with_key=False)
    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    rows = table_rows(report, "tpt")
    assert len(rows) == 2, report
    assert "tta.callbacks.tpt.lr=0.001" in rows[0] and "| 2 |" in rows[0] and "55.0 ± 7.1" in rows[0]
    assert "tta.callbacks.tpt.lr=0.005" in rows[1] and "| 1 |" in rows[1]
    assert "\nRows differ in: tta.callbacks.tpt.lr\n" in report


def test_other_weights_are_another_row_named_by_their_fingerprint(tmp_path):
    write_run(tmp_path / "a", resolved_config(), 0.5, weights="sha256:0123456789abcdef")
    write_run(tmp_path / "b", resolved_config(seed=1), 0.6, weights="sha256:fedcba9876543210")
    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    rows = table_rows(report, "none")
    assert len(rows) == 2, report
    assert "inputs.weights=01234567" in rows[0] and "inputs.weights=fedcba98" in rows[1]
    assert "\nRows differ in: inputs.weights\n" in report


def test_runs_from_python_are_grouped_by_their_key(tmp_path, capsys):
    """A ``PredictionWriter`` run from Python keys its settings by object (``callbacks`` a list),
    with the seed given and the seed in force."""
    for k, (lr, seed) in enumerate(((1e-3, 0), (1e-3, 1), (5e-3, 0))):
        run = write_run(tmp_path / str(k), resolved_config(seed=seed, tta=tpt(lr)), 0.5 + 0.1 * k)
        metrics = json.loads((run / "metrics.json").read_text())
        del metrics["run"]
        metrics["key"] = {
            "seed": seed,
            "seed_in_force": seed,
            "precision": "32-true",
            "model": {"class": "tta.tasks.zero_shot.ZeroShotClassifier", "templates": ["a photo of a {}."]},
            "data": {"class": "tta.datamodules.world.WorldDataModule", "severity": 3, "seed": 10000},
            "callbacks": [{"class": "tta.callbacks.tpt.TPT", "lr": lr, "seed": None}],
            "inputs": {"weights": "sha256:0123456789abcdef", "data": None},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    main([str(tmp_path)])
    report = (tmp_path / "report.md").read_text()
    rows = table_rows(report, "tpt")
    assert len(rows) == 2, report
    assert "callbacks.0.lr=0.001" in rows[0] and "| 2 |" in rows[0] and "55.0 ± 7.1" in rows[0]
    assert "callbacks.0.lr=0.005" in rows[1] and "| 1 |" in rows[1]
    assert "\nRows differ in: callbacks.0.lr\n" in report
    assert "callbacks.0.lr=0.001" in capsys.readouterr().out


def test_a_closed_pipe_ends_quietly(tmp_path):
    """``tta-report DIR | head -1``: the reader is gone before the table is printed. The reading end
    is closed before the command starts, so that every write meets the closed pipe (with ``head``
    the outcome would hang on how fast each side runs)."""
    for seed in range(3):
        write_run(tmp_path / "sweep" / str(seed), resolved_config(seed=seed), 0.5)
    reading, writing = os.pipe()
    os.close(reading)
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    try:
        done = subprocess.run(
            [str(console_script("tta-report")), "sweep"],
            cwd=tmp_path,
            env=env,
            stdout=writing,
            stderr=subprocess.PIPE,
            text=True,
            timeout=300,
        )
    finally:
        os.close(writing)
    assert done.returncode == 0 and done.stderr == "", done.stderr[-3000:]
    assert (tmp_path / "sweep" / "report.md").is_file()


DAMAGED_PREDICTIONS = {
    "garbled rows": f"{PREDICTIONS_HEADER}\n0,clean,1,1,0.9,1,0.9\n1,clean,0\n".encode(),
    "missing columns": b"index,domain,label,pred\n0,clean,1,1\n",
    "non-numeric values": f"{PREDICTIONS_HEADER}\n0,clean,1,1,high,1,0.9\n".encode(),
    "undecodable bytes": f"{PREDICTIONS_HEADER}\n0,clean,1,1,0.9,1,0.9\n".encode() + b"\xff\xfe\x00garbage\n",
    "no header": b"",
}


@pytest.mark.parametrize("damage", DAMAGED_PREDICTIONS)
def test_a_damaged_predictions_csv_is_skipped_with_one_warning(tmp_path, capsys, damage):
    good = write_run(tmp_path / "good", resolved_config(), 0.5)
    (good / "predictions.csv").write_text(f"{PREDICTIONS_HEADER}\n0,clean,1,1,0.9,1,0.9\n1,noise,2,0,0.6,0,0.6\n")
    damaged = write_run(tmp_path / "damaged", resolved_config(seed=1), 0.6)
    (damaged / "predictions.csv").write_bytes(DAMAGED_PREDICTIONS[damage])
    main([str(tmp_path)])
    warnings = capsys.readouterr().err.splitlines()
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"tta-report: warning: skipping {damaged / 'predictions.csv'} (")
    assert (tmp_path / "report.md").is_file() and (tmp_path / "reliability.png").is_file()  # from the good run


def test_every_printed_line_fits_80_columns(tmp_path):
    """Seven domains, long method names, several differing settings, an unfinished run and a
    long directory name: the printed table fits 80 columns, report.md keeps every column."""
    sweep = tmp_path / "a_sweep_directory_with_a_rather_long_name_to_fold_the_wrote_line"
    methods = ("sts+lame+views-with-the-longest-name-we-could-find", "tpt+lame-adapted-over-every-view")
    for k, (method, lr, severity, seed) in enumerate(
        (m, lr, s, seed) for m in methods for lr in (1e-3, 5e-3) for s in (1, 5) for seed in (0, 1)
    ):
        config = resolved_config(seed=seed, severity=severity, tta={"adapter": {"_target_": method, "lr": lr}})
        config["model"]["templates"] = [f"a rather long prompt template number {severity} for a {{}}."]
        write_run(sweep / f"job_{k}", config, 0.25 + 0.05 * k, method=method)
    unfinished = sweep / "a_job_that_was_stopped_with_a_long_directory_name_of_its_own_too" / "x"
    unfinished.mkdir(parents=True)
    (unfinished / "progress.json").write_text(json.dumps({"format": 2, "batches": [4]}))
    done = run_script("tta-report", [str(sweep)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    lines = done.stdout.splitlines()
    assert max(map(len, lines)) <= 80, "\n".join(line for line in lines if len(line) > 80)
    printed = "".join(done.stdout.split())  # the folded lines joined again, spaces aside
    assert f"fulltable:{sweep / 'report.md'}" in printed and f"in{sweep}" in printed
    assert "Unfinished runs (1" in done.stdout and "adapter.lr=0.005" in done.stdout
    report = (sweep / "report.md").read_text()
    assert "| " + " | ".join(DOMAINS) + " |" in report
    assert len(table_rows(report, methods[0])) == 4  # (lr) x (severity), seeds pooled
