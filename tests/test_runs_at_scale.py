"""Runs at scale: kill and resume, DDP on CPU, sweeps and their report, determinism."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time

import pytest
import pytorch_lightning as pl
import torch
from conftest import console_script, run_script

from tta.callbacks import TPT, PredictionWriter, TTAProgressBar
from tta.callbacks.writer import TIMING_KEYS
from tta.datamodules import WorldDataModule
from tta.datamodules.streams import StreamSampler
from tta.tasks import ZeroShotClassifier

#: Same thread count in every process: float reductions then add up in the same order, so
#: one-device and DDP runs (and resumed runs) agree bit for bit.
ONE_THREAD = {"OMP_NUM_THREADS": "1"}
#: TPT (per-sample seeds) stacked with LAME (batch-level): resuming or splitting a stream must
#: keep both the samples' seeds and the batches' composition. Without the view store, whose reads
#: would make the killed run too quick to kill mid-way.
SLOW_RUN = [
    "tta=[tpt,lame]",
    "view_store=null",
    "tta.callbacks.tpt.n_views=8",
    "data.domains=[noise,blur]",
    "data.n_per_domain=96",
    "data.batch_size=8",
    "trainer.enable_progress_bar=false",
    "print_table=false",
]


def predictions_equal_metrics(a, b) -> None:
    """Same rows byte for byte, same metrics.json but for timing, memory and the run config and key."""
    assert (a / "predictions.csv").read_bytes() == (b / "predictions.csv").read_bytes()
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (a, b))
    for m in (ma, mb):
        m.pop("run", None)
        m.pop("key", None)
        for key in TIMING_KEYS:
            m.pop(key)
        for domain in m["domains"].values():
            for key in TIMING_KEYS:
                domain.pop(key, None)
    assert ma == mb


def tta_predict(args, cwd, extra_env=None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | ONE_THREAD | (extra_env or {})
    done = subprocess.run(
        [str(console_script("tta-predict")), *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


# --- the stream split and skip ------------------------------------------------------------------


def test_stream_sampler_deals_whole_batches_and_skips_finished_ones():
    order = torch.randperm(23, generator=torch.Generator().manual_seed(0))
    batches = [order[i : i + 5].tolist() for i in range(0, 23, 5)]  # 5 batches, the last of 3
    ranks = [StreamSampler(order, 5, rank, 2).positions for rank in range(2)]
    assert ranks[0] == batches[0] + batches[2] + batches[4] and ranks[1] == batches[1] + batches[3]
    assert StreamSampler(order, 5, 0, 2, start_batch=1).positions == batches[2] + batches[4]
    assert StreamSampler(order, 5).positions == order.tolist()
    assert len(StreamSampler(order, 5, start_batch=5)) == 0


# --- crash-safe results -------------------------------------------------------------------------


def test_killed_run_resumes_to_the_same_results(tmp_path):
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    tta_predict([*SLOW_RUN, f"hydra.run.dir={whole}"], tmp_path)
    total = len(json.loads((whole / "progress.json").read_text())["batches"])

    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")} | ONE_THREAD
    process = subprocess.Popen(
        [str(console_script("tta-predict")), *SLOW_RUN, f"hydra.run.dir={killed}"],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    progress, done = killed / "progress.json", 0
    deadline = time.monotonic() + 300
    while done < 3 and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
        with contextlib.suppress(FileNotFoundError, json.JSONDecodeError):
            done = len(json.loads(progress.read_text())["batches"])
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed mid-way"
    kept = len(json.loads(progress.read_text())["batches"])
    assert 3 <= kept < total and not (killed / "metrics.json").exists()
    rows_kept = (killed / "predictions.csv").read_text().splitlines()
    with open(killed / "predictions.csv", "a") as f:
        f.write("999,noi")  # a row cut off by the kill: not part of a finished batch

    tta_predict([*SLOW_RUN, f"hydra.run.dir={killed}"], tmp_path)
    rows = (killed / "predictions.csv").read_text().splitlines()
    assert rows[: len(rows_kept)] == rows_kept  # finished work is kept, not redone
    assert len(rows) == 1 + 2 * 96 and len({r.split(",")[0] for r in rows[1:]}) == 2 * 96
    predictions_equal_metrics(whole, killed)


def test_a_directory_of_another_run_is_refused(tmp_path):
    tta_predict(
        [
            "data.domains=[clean]",
            "data.n_per_domain=8",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={tmp_path / 'run'}",
        ],
        tmp_path,
    )
    done = run_script(
        "tta-predict", ["data.domains=[clean]", "data.n_per_domain=9", f"hydra.run.dir={tmp_path / 'run'}"], tmp_path
    )
    assert done.returncode == 2
    assert "holds the results of a different run" in done.stderr and "Traceback" not in done.stderr


# --- more than one device -----------------------------------------------------------------------


def test_ddp_on_two_cpu_processes_equals_one_device(tmp_path):
    common = [
        "tta=lame",
        "data.domains=[clean,noise,hue]",
        "data.n_per_domain=30",
        "data.batch_size=16",
        "trainer.enable_progress_bar=false",
        "print_table=false",
    ]
    tta_predict([*common, f"hydra.run.dir={tmp_path / 'one'}"], tmp_path)
    tta_predict([*common, "trainer=ddp_cpu", f"hydra.run.dir={tmp_path / 'two'}"], tmp_path)
    parts = sorted(p.name for p in (tmp_path / "two" / "parts").iterdir())
    assert parts == ["rank0of2", "rank1of2"]
    sizes = [json.loads((tmp_path / "two" / "parts" / p / "progress.json").read_text())["batches"] for p in parts]
    assert sum(map(sum, sizes)) == 90 and all(sizes)  # both processes worked; every sample once
    predictions_equal_metrics(tmp_path / "one", tmp_path / "two")


# --- sweeps and the report ----------------------------------------------------------------------


def test_sweep_and_report(tmp_path):
    sweep = tmp_path / "sweep"
    done = run_script(
        "tta-predict",
        [
            "-m",
            "tta=none,lame",
            "data.severity=1,3",
            "seed=0,1",
            "data.domains=[clean,noise]",
            "data.n_per_domain=16",
            "trainer.enable_progress_bar=false",
            "print_table=false",
            f"hydra.sweep.dir={sweep}",
        ],
        tmp_path,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert len(list(sweep.glob("*/metrics.json"))) == 8
    done = run_script("tta-report", [str(sweep)], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    report = (sweep / "report.md").read_text()
    rows = [line for line in report.splitlines() if line.startswith(("| none", "| lame"))]
    assert len(rows) == 4  # (method) x (severity), seeds pooled into mean ± std
    assert all("±" in row for row in rows)
    for name in ("accuracy_vs_severity.png", "reliability.png", "report.png"):
        assert (sweep / name).stat().st_size > 1000


# --- determinism and the progress bar -----------------------------------------------------------


@pytest.fixture(scope="module")
def small_world():
    data = WorldDataModule(domains=["noise", "hue"], n_per_domain=12, batch_size=8)
    return data


def test_same_seed_same_predictions_csv(shipped_vlm, small_world, tmp_path):
    for name in ("a", "b"):
        module = ZeroShotClassifier(shipped_vlm)
        trainer = pl.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[TPT(n_views=8, seed=3), PredictionWriter(tmp_path / name, seed=3)],
        )
        trainer.predict(module, datamodule=small_world, return_predictions=False)
    assert (tmp_path / "a" / "predictions.csv").read_bytes() == (tmp_path / "b" / "predictions.csv").read_bytes()


def test_progress_bar_shows_the_running_accuracy(shipped_vlm, small_world, tmp_path):
    writer, bar = PredictionWriter(tmp_path, seed=0), TTAProgressBar()
    trainer = pl.Trainer(logger=False, enable_model_summary=False, callbacks=[writer, bar])
    trainer.predict(ZeroShotClassifier(shipped_vlm), datamodule=small_world, return_predictions=False)
    description = bar.progress.tasks[-1].description
    # the last batch's rows go out at the epoch's end: the bar ends on every row, as the table does
    assert description.endswith(f"acc {100 * writer.metrics['accuracy']:.1f}%"), description
    assert writer.progress["acc"] == pytest.approx(writer.metrics["accuracy"])


def test_a_datamodule_reused_after_a_resume_starts_over(shipped_vlm, tmp_path):
    data = WorldDataModule(domains=["clean"], n_per_domain=20, batch_size=8)

    def predict(directory):
        trainer = pl.Trainer(
            logger=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            callbacks=[PredictionWriter(directory, seed=0)],
        )
        trainer.predict(ZeroShotClassifier(shipped_vlm), datamodule=data, return_predictions=False)
        return (directory / "predictions.csv").read_text().splitlines()

    whole = predict(tmp_path / "a")
    predict(tmp_path / "a")  # finished: resumes after its last batch, predicts nothing
    assert data.start_batch == 3
    assert predict(tmp_path / "b") == whole  # a fresh directory gets every batch again


def test_report_tabulates_the_task_headline(tmp_path):
    """Non-classification runs (groups, search episodes) name their headline metric; no ECE, no
    reliability diagram."""
    from tta.report import report

    for seed, scores in ((0, (0.5, 0.25)), (1, (0.7, 0.35))):
        run = tmp_path / str(seed)
        run.mkdir()
        metrics = {
            "method": "ttm",
            "model": "m",
            "data": "world_groups",
            "seed": seed,
            "n": 4,
            "group_score": sum(scores) / 2,
            "headline": "group_score",
            "ms_per_sample": 1.0,
            "peak_mem_mb": 10.0,
            "domains": {"clean": {"n": 2, "group_score": scores[0]}, "noise": {"n": 2, "group_score": scores[1]}},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    table, written = report(tmp_path)
    row = next(line for line in table.splitlines() if line.startswith("| ttm"))
    assert "60.0 ± 14.1" in row and "30.0 ± 7.1" in row and "| - |" in row  # clean, noise (= shifted mean), no ECE
    assert "shifted mean (group_score)" in table
    assert written == ["report.md", "report.png"]


def test_report_keeps_stream_orders_apart(tmp_path):
    """A sweep over data.stream gets one row per stream: LAME on a sorted stream is not a seed of
    LAME on an i.i.d. one."""
    from tta.report import report

    for k, (order, accuracy) in enumerate((("iid", 0.4), ("sorted", 0.6), ("iid", 0.5), ("sorted", 0.8))):
        run = tmp_path / str(k)
        run.mkdir()
        metrics = {
            "method": "lame",
            "model": "m",
            "data": "world",
            "seed": k // 2,
            "n": 2,
            "accuracy": accuracy,
            "ms_per_sample": 1.0,
            "peak_mem_mb": 10.0,
            "domains": {"clean": {"n": 2, "accuracy": accuracy}},
            "run": {"config": {"data": {"stream": order}}},
        }
        (run / "metrics.json").write_text(json.dumps(metrics))
    table, _ = report(tmp_path)
    rows = [line for line in table.splitlines() if line.startswith("| lame")]
    assert len(rows) == 2
    assert "world (iid stream)" in rows[0] and "45.0 ± 7.1" in rows[0]
    assert "world (sorted stream)" in rows[1] and "70.0 ± 14.1" in rows[1]
