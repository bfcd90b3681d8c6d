"""Runs that survive what clusters and people do to them: stop signals, two writers, damaged files,
a reused folder, a wrong class list (issue 17). Each fault goes through a real entry point:
``tta-predict`` / ``tta-report`` in a subprocess, or ``Trainer.predict`` from Python.

The DiffTPT view cache's damaged files are tested in ``test_difftpt.py``.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import re
import resource
import shlex
import shutil
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import pytorch_lightning as pl
from conftest import (
    BATCHES,
    ENV,
    HEADER,
    RUN,
    batches_done,
    class_tree,
    console_script,
    one_line_error,
    snapshot,
    start,
    tta_predict,
    wait_for_batches,
)

from tta.callbacks import TPT, PredictionWriter
from tta.datamodules import ImageFolderDataModule, WorldDataModule
from tta.run_folder import RunFolderError
from tta.tasks import ZeroShotClassifier


def copy_of(run: Path, tmp_path: Path, name: str) -> Path:
    target = tmp_path / name
    shutil.copytree(run, target)
    return target


# --- 1, 2: SIGTERM and SIGINT -----------------------------------------------------------------


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_stop_signal_ends_the_run_after_its_batch_with_a_resume_hint(reference, tmp_path, stop, exit_code):
    run = tmp_path / "run"
    process = start([*RUN, f"hydra.run.dir={run}"], tmp_path)
    wait_for_batches(run, 2, process)
    process.send_signal(stop)
    _, err = process.communicate(timeout=600)
    assert process.returncode == exit_code, err[-3000:]
    progress = json.loads((run / "progress.json").read_text())
    done = len(progress["batches"])
    assert 2 <= done < BATCHES and not (run / "metrics.json").exists()
    assert err.strip().splitlines()[-1] == (
        f"tta-predict: stopped by {stop.name} after batch {done} of {BATCHES}; resume with: "
        + shlex.join(["tta-predict", *RUN, f"hydra.run.dir={run.relative_to(tmp_path)}"])
    )
    # the finished batches are written whole and nothing else: the uninterrupted run's first rows
    written = (run / "predictions.csv").read_bytes()
    assert len(written) == len(HEADER) + sum(size for size, _ in progress["predictions.csv"])
    assert written == (reference / "predictions.csv").read_bytes()[: len(written)]
    # the reruns that resume such a run: the DDP and the sweep tests below


def test_a_stopped_ddp_run_stops_every_process_and_resumes_to_the_one_device_rows(reference, tmp_path):
    """SIGTERM to the process that started DDP: it passes the stop to the process Lightning started,
    each stops after its own batch and is waited for; the rerun resumes both parts."""
    run = tmp_path / "run"
    args = [*RUN, "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    process = start(args, tmp_path)
    wait_for_batches(run / "parts" / "rank0of2", 2, process)
    process.send_signal(signal.SIGTERM)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 143, err[-3000:]
    assert re.fullmatch(r"tta-predict: stopped by SIGTERM after batch \d of 6; .*", err.strip().splitlines()[-1])
    assert batches_done(run / "parts" / "rank1of2") < BATCHES // 2  # the other process stopped too
    done = tta_predict(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert (run / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()


def test_a_submitit_requeue_still_resumes_the_job(reference, tmp_path):
    """What Hydra's submitit launcher does on a cluster, with its local executor: the signal that
    SLURM sends before a job's time limit (USR2) makes submitit requeue the job and exit; the
    requeued job resumes from the finished batches and ends equal to an uninterrupted run."""
    pytest.importorskip("hydra_plugins.hydra_submitit_launcher")
    sweep = tmp_path / "sweep"
    process = start(["-m", "hydra/launcher=submitit_local", *RUN, f"hydra.sweep.dir={sweep}"], tmp_path)
    job = sweep / "0"
    wait_for_batches(job, 2, process)
    first = int(re.search(r"PID (\d+)", (job / "run.lock").read_text()).group(1))
    os.kill(first, signal.SIGUSR2)
    _, err = process.communicate(timeout=900)
    assert process.returncode == 0, err[-3000:]
    logs = "".join(p.read_text() for p in (sweep / ".submitit").rglob("*.err"))
    assert "Caught signal SIGUSR2" in logs and "this job is preempted" in logs
    assert f"PID {first} " not in (job / "run.lock").read_text()  # requeued: another process finished it
    assert (job / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()


# --- 3: two writers (load test) ---------------------------------------------------------------


def test_two_writers_on_one_directory_one_runs_the_other_stops_at_once(reference, tmp_path):
    """The same command started twice: whichever takes the lock first runs; it is held still (SIGSTOP)
    while it holds the lock so that the two overlap however the machine schedules them; the other
    exits with the lock message naming the holder's PID; the result is one run's."""
    run = tmp_path / "run"
    processes = [start([*RUN, f"hydra.run.dir={run}"], tmp_path) for _ in range(2)]
    deadline = time.monotonic() + 600
    while not (found := re.search(r"PID (\d+)", (run / "run.lock").read_text() if (run / "run.lock").exists() else "")):
        assert time.monotonic() < deadline and all(p.poll() is None for p in processes)
        time.sleep(0.01)
    holder = next(p for p in processes if p.pid == int(found.group(1)))
    other = next(p for p in processes if p is not holder)
    holder.send_signal(signal.SIGSTOP)
    try:
        out, err = other.communicate(timeout=600)
    finally:
        holder.send_signal(signal.SIGCONT)
    refused = subprocess.CompletedProcess(other.args, other.returncode, out, err)
    one_line_error(refused, f"is in use by another run (PID {holder.pid} on ")
    _, err = holder.communicate(timeout=600)
    assert holder.returncode == 0, err[-3000:]
    assert (run / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
    assert json.loads((run / "progress.json").read_text())["batches"] == [4] * BATCHES


# --- the load test: a sweep stopped by SIGTERM and SIGKILL ------------------------------------


def test_a_sweep_stopped_by_sigterm_and_sigkill_ends_equal_to_an_uninterrupted_one(tmp_path):
    sweep_args = [
        "-m",
        "tta=tpt",
        "view_store=null",  # the stopped sweep must not read the views the whole one stored
        "tta.callbacks.tpt.n_views=4,8",
        "seed=0,1",
        "data.domains=[noise]",
        "data.n_per_domain=24",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        "print_table=false",
    ]
    jobs, per_job = 4, 6
    whole = tta_predict([*sweep_args, f"hydra.sweep.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    sweep = tmp_path / "stopped"
    rng = random.Random(17)
    for stop in (signal.SIGTERM, signal.SIGKILL):
        # a random batch boundary of a job that is not finished yet
        unfinished = [j for j in range(jobs) if batches_done(sweep / str(j)) < per_job - 1]
        job = rng.choice(unfinished)
        batch = rng.randint(batches_done(sweep / str(job)) + 1, per_job - 1)
        process = start([*sweep_args, f"hydra.sweep.dir={sweep}"], tmp_path)
        wait_for_batches(sweep / str(job), batch, process)
        process.send_signal(stop)
        _, err = process.communicate(timeout=600)
        if stop == signal.SIGTERM:
            assert process.returncode == 143, err[-3000:]
            resume = r"stopped by SIGTERM after batch \d+ of 6; resume with: tta-predict -m .* hydra.sweep.dir=stopped"
            assert re.search(resume, err), err[-3000:]
        else:
            assert process.returncode == -signal.SIGKILL
    assert any(batches_done(sweep / str(j)) < per_job for j in range(jobs))
    done = tta_predict([*sweep_args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for j in range(jobs):
        expected = (tmp_path / "whole" / str(j) / "predictions.csv").read_bytes()
        assert (sweep / str(j) / "predictions.csv").read_bytes() == expected, j
        assert (sweep / str(j) / "metrics.json").is_file()


def test_an_online_sweep_killed_at_random_batches_ends_equal_to_an_uninterrupted_one(tmp_path):
    """TDA carries its caches from one sample to the next: a sweep over stream orders and seeds, killed
    (SIGKILL, no chance to clean up) at seeded random batches and rerun after each kill, ends with the
    bytes of an uninterrupted sweep, its caches restored from the state saved with each batch."""
    sweep_args = [
        "-m",
        "tta=tda",
        "view_store=null",  # views read from a store would make the batches too quick to kill between
        "tta.callbacks.tda.n_views=10",
        "data.stream=iid,sorted",
        "seed=0,1",
        "data.domains=[clean,noise]",
        "data.n_per_domain=12",
        "data.batch_size=4",
        "trainer.enable_progress_bar=false",
        "print_table=false",
    ]
    jobs, per_job = 4, 6
    whole = tta_predict([*sweep_args, f"hydra.sweep.dir={tmp_path / 'whole'}"], tmp_path)
    assert whole.returncode == 0, whole.stderr[-3000:]

    sweep = tmp_path / "killed"
    rng = random.Random(24)
    kills = 0
    while kills < 4:
        # a random batch of the first job that has one left before its last (the sweep runs jobs in order)
        unfinished = [j for j in range(jobs) if batches_done(sweep / str(j)) < per_job - 1]
        if not unfinished:
            break
        job = unfinished[0]
        batch = rng.randint(batches_done(sweep / str(job)) + 1, per_job - 1)
        process = start([*sweep_args, f"hydra.sweep.dir={sweep}"], tmp_path)
        wait_for_batches(sweep / str(job), batch, process)
        process.send_signal(signal.SIGKILL)
        process.communicate(timeout=600)
        assert process.returncode == -signal.SIGKILL
        kills += 1
    assert kills >= 3 and any(batches_done(sweep / str(j)) < per_job for j in range(jobs))
    done = tta_predict([*sweep_args, f"hydra.sweep.dir={sweep}"], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    for j in range(jobs):
        expected = (tmp_path / "whole" / str(j) / "predictions.csv").read_bytes()
        assert (sweep / str(j) / "predictions.csv").read_bytes() == expected, j
        assert len(list((sweep / str(j)).glob("stream_state-*.safetensors"))) == 1


# --- 4: the Python writer's run key -----------------------------------------------------------


def python_predict(vlm, directory: Path, data: WorldDataModule, callbacks=(), module=None) -> None:
    trainer = pl.Trainer(
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=[*callbacks, PredictionWriter(directory, seed=0)],
    )
    trainer.predict(module or ZeroShotClassifier(vlm), datamodule=data, return_predictions=False)


def world(**settings) -> WorldDataModule:
    return WorldDataModule(**{"domains": ["clean"], "n_per_domain": 24, "batch_size": 4} | settings)


@pytest.mark.parametrize(
    ("data", "callbacks", "named"),
    [
        ({"n_per_domain": 30}, (), "data.n_per_domain is 24 there, 30 here"),
        ({"n_per_domain": 12}, (), "data.n_per_domain is 24 there, 12 here"),  # fewer batches than written
        ({"domains": ["clean", "blur"]}, (), "data.domains"),
        ({"severity": 5}, (), "data.severity is 3 there, 5 here"),
        ({}, (TPT(n_views=4, seed=0),), "callbacks"),
    ],
)
def test_the_python_writer_refuses_a_folder_of_other_settings(shipped_vlm, tmp_path, data, callbacks, named):
    python_predict(shipped_vlm, tmp_path, world())
    before = snapshot(tmp_path)
    with pytest.raises(RunFolderError, match="holds the results of a different run") as info:
        python_predict(shipped_vlm, tmp_path, world(**data), callbacks)
    assert named in str(info.value)
    assert snapshot(tmp_path) == before


def test_the_python_writer_resumes_its_own_settings_with_a_fresh_or_reused_module(shipped_vlm, tmp_path):
    module = ZeroShotClassifier(shipped_vlm)  # class_names from the datamodule, filled in at setup
    python_predict(shipped_vlm, tmp_path, world(), module=module)
    rows = (tmp_path / "predictions.csv").read_bytes()
    python_predict(shipped_vlm, tmp_path, world(), module=module)
    python_predict(shipped_vlm, tmp_path, world())
    assert (tmp_path / "predictions.csv").read_bytes() == rows


# --- 7: resume verifies what it keeps ---------------------------------------------------------


@pytest.fixture(scope="module")
def finished_world_run(shipped_vlm, tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("finished") / "run"
    python_predict(shipped_vlm, directory, world())
    return directory


def garble(lines: list[bytes]) -> list[bytes]:
    return [*lines[:9], lines[9].replace(b",", b";", 1), *lines[10:]]


@pytest.mark.parametrize(
    ("file", "damage", "what"),
    [
        ("predictions.csv", garble, "batch 3 of the 6 recorded differs"),
        ("predictions.csv", lambda lines: lines[:9] + lines[10:], "batch 3 of the 6 recorded differs"),  # deleted
        ("predictions.csv", lambda lines: lines[:9] + lines[8:], "batch 3 of the 6 recorded differs"),  # inserted
        ("timing.csv", garble, "batch 3 of the 6 recorded differs"),
    ],
)
def test_resume_refuses_rows_that_do_not_match_progress(shipped_vlm, finished_world_run, tmp_path, file, damage, what):
    run = copy_of(finished_world_run, tmp_path, "run")
    lines = (run / file).read_bytes().splitlines(keepends=True)
    (run / file).write_bytes(b"".join(damage(lines)))
    before = snapshot(run)
    with pytest.raises(RunFolderError) as info:
        python_predict(shipped_vlm, run, world())
    message = str(info.value)
    assert f"{run / file} does not match {run / 'progress.json'} ({what}" in message
    assert f"move {run} aside" in message and "\n" not in message
    assert snapshot(run) == before  # never cut, never padded


def test_a_row_cut_off_by_a_kill_is_the_one_thing_repaired(shipped_vlm, finished_world_run, tmp_path):
    run = copy_of(finished_world_run, tmp_path, "run")
    with open(run / "predictions.csv", "ab") as f:
        f.write(b"999,cl")
    python_predict(shipped_vlm, run, world())
    assert (run / "predictions.csv").read_bytes() == (finished_world_run / "predictions.csv").read_bytes()


# --- 5, 6, 9, 10: one-line refusals from tta-predict -------------------------------------------


def test_refusals_are_one_line_naming_the_input_and_the_fix(reference, tmp_path):
    """Faults 5, 6, 9 and 10, each a tta-predict command that must stop with one line and exit 2
    (run a few at a time: each is a process start)."""
    corrupt = copy_of(reference, tmp_path, "corrupt")
    (corrupt / "progress.json").write_text('{"format": 2, "batches": [4, 4')
    deleted = copy_of(reference, tmp_path, "deleted")
    (deleted / "predictions.csv").unlink()
    other = copy_of(reference, tmp_path, "other")
    other_before = snapshot(other)
    (tmp_path / "a_file").write_text("")
    tree = class_tree(tmp_path / "images", ["cat", "dog", "sea_lion"], per_folder=2)
    broken = tmp_path / "broken_images"
    shutil.copytree(tree, broken)
    (broken / "dog" / "broken.jpg").write_bytes(b"not a jpeg")
    folder = ["data=image_folder", "data.num_workers=0", "trainer.enable_progress_bar=false", "print_table=false"]
    cases = {
        "corrupt progress.json": (
            [*RUN, f"hydra.run.dir={corrupt}"],
            [f"{corrupt / 'progress.json'} is damaged", f"move {corrupt} aside"],
        ),
        "deleted predictions.csv": (
            [*RUN, f"hydra.run.dir={deleted}"],
            [f"{deleted / 'predictions.csv'} is missing but", "restore the file, or move"],
        ),
        "a folder of another run": (
            [*(a.replace("=48", "=40") for a in RUN), f"hydra.run.dir={other}"],
            ["holds the results of a different run: data.n_per_domain is 48 there, 40 here"],
        ),
        "a run directory under a file": (
            [*RUN, f"hydra.run.dir={tmp_path / 'a_file' / 'run'}"],
            [f"{tmp_path / 'a_file'} is a file, not a folder", "hydra.run.dir"],
        ),
        "seed=abc": ([*RUN, "seed=abc", f"hydra.run.dir={tmp_path / 'seed'}"], ["seed must be an integer", "'abc'"]),
        "image_folder without data.root": (
            ["data=image_folder", f"hydra.run.dir={tmp_path / 'root'}"],
            ["data.root is not set", "data.root=<value>"],
        ),
        "a permuted class list": (
            [*folder, f"data.root={tree}", "data.class_names=[dog,cat,sea lion]", f"hydra.run.dir={tmp_path / 'p'}"],
            ["in another order", "['cat', 'dog', 'sea_lion']", "leave data.class_names unset"],
        ),
        "on_bad_image=error": (
            [*folder, f"data.root={broken}", "data.on_bad_image=error", f"hydra.run.dir={tmp_path / 'bad'}"],
            [f"cannot decode the image {broken / 'dog' / 'broken.jpg'}", "data.on_bad_image=skip"],
        ),
    }
    with ThreadPoolExecutor(max_workers=3) as pool:
        done = dict(zip(cases, pool.map(lambda case: tta_predict(case[0], tmp_path), cases.values())))
    for name, (_, expected) in cases.items():
        try:
            one_line_error(done[name], *expected)
        except AssertionError as error:
            raise AssertionError(f"{name}: {error}") from None
    # 9: the refused run wrote nothing, .hydra/ included; run.lock names the last process that locked it
    assert {k: v for k, v in snapshot(other).items() if k != "run.lock"} == {
        k: v for k, v in other_before.items() if k != "run.lock"
    }


def test_undecodable_images_are_named_at_the_end(shipped_vlm, tmp_path, caplog):
    tree = class_tree(tmp_path / "images", ["cat", "dog"], per_folder=3)
    for name in ("broken.jpg", "empty.png"):
        (tree / "dog" / name).write_bytes(b"" if name == "empty.png" else b"not a jpeg")
    data = ImageFolderDataModule(tree, image_size=shipped_vlm.image_size[0], batch_size=4)
    with caplog.at_level("WARNING", logger="tta.callbacks.writer"):
        python_predict(shipped_vlm, tmp_path / "run", data)
    metrics = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert metrics["skipped_images"] == 2 and metrics["n"] == 6
    assert sorted(metrics["skipped_image_paths"]) == [str(tree / "dog" / "broken.jpg"), str(tree / "dog" / "empty.png")]
    warned = [r.getMessage() for r in caplog.records if "could not be decoded" in r.getMessage()]
    assert len(warned) == 1 and warned[0].startswith("2 images could not be decoded")
    assert str(tree / "dog" / "broken.jpg") in warned[0] and "data.on_bad_image=error" in warned[0]
    strict = ImageFolderDataModule(tree, image_size=shipped_vlm.image_size[0], batch_size=4, on_bad_image="error")
    with pytest.raises(ValueError, match=r"cannot decode the image .*dog/(broken.jpg|empty.png)"):
        python_predict(shipped_vlm, tmp_path / "strict", strict)


@contextlib.contextmanager
def read_only(folder: Path):
    """``folder`` and what it holds made unwritable: by mode bits, or (as root, whom they do not
    stop) by the immutable attribute. Skips the test where neither works."""
    if os.geteuid() != 0:
        modes = {p: p.stat().st_mode for p in [folder, *folder.rglob("*")]}
        for p in modes:
            p.chmod(0o555 if p.is_dir() else 0o444)
        try:
            yield
        finally:
            for p, mode in modes.items():
                p.chmod(mode)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "-R", "+i", str(folder)]).returncode != 0:
        pytest.skip("cannot make a folder read-only here (root without chattr +i)")
    try:
        yield
    finally:
        subprocess.run(["chattr", "-R", "-i", str(folder)], check=True)


def test_a_read_only_run_directory_is_one_line(reference, tmp_path):
    run = copy_of(reference, tmp_path, "run")
    with read_only(run):
        done = tta_predict([*RUN, f"hydra.run.dir={run}"], tmp_path)
    one_line_error(done, f"cannot write in the run directory {run}", "make it writable")


def test_a_full_disk_is_one_line_and_the_rerun_resumes(tmp_path):
    """A file size limit (RLIMIT_FSIZE) stands in for a full disk: the write fails the same way."""
    args = [
        "data.domains=[clean]",
        "data.n_per_domain=500",
        "trainer.enable_progress_bar=false",
        "print_table=false",
        f"hydra.run.dir={tmp_path / 'run'}",
    ]

    def limit_file_size() -> None:
        # the CSVs outgrow it in their fourth batch of 64 rows (about 24 bytes a row); the config
        # record (.hydra/hydra.yaml, 3.5 kB) and progress.json stay under it
        resource.setrlimit(resource.RLIMIT_FSIZE, (6000, 6000))
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # fail the write rather than kill the process

    done = tta_predict(args, tmp_path, preexec_fn=limit_file_size)
    one_line_error(
        done,
        f"cannot write {tmp_path / 'run' / 'predictions.csv'} (File too large)",
        "rerun to resume (finished batches are kept); resume with: "
        + shlex.join(["tta-predict", *args[:-1], "hydra.run.dir=run"]),
    )
    assert batches_done(tmp_path / "run") == 3
    done = tta_predict(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = (tmp_path / "run" / "predictions.csv").read_text().splitlines()[1:]
    assert len(rows) == 500 and len({row.split(",")[0] for row in rows}) == 500


# --- 11: tta-report ---------------------------------------------------------------------------


def test_report_skips_a_damaged_metrics_json_and_lists_unfinished_runs(tmp_path):
    sweep = tmp_path / "sweep"
    for job, accuracy in (("0", 0.5), ("1", 0.7)):
        (sweep / job).mkdir(parents=True)
        metrics = {
            "method": "none",
            "model": "m",
            "data": "world",
            "seed": int(job),
            "n": 4,
            "accuracy": accuracy,
            "ece": 0.1,
            "ms_per_sample": 1.0,
            "peak_mem_mb": 10.0,
            "domains": {"clean": {"n": 4, "accuracy": accuracy, "ece": 0.1}},
        }
        (sweep / job / "metrics.json").write_text(json.dumps(metrics))
    (sweep / "2").mkdir()
    (sweep / "2" / "metrics.json").write_text('{"method": "none", "mod')  # cut off
    (sweep / "3").mkdir()
    (sweep / "3" / "progress.json").write_text(json.dumps({"format": 2, "batches": [4, 4, 4]}))
    done = subprocess.run(
        [str(console_script("tta-report")), str(sweep)], cwd=tmp_path, env=ENV, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stderr
    warnings = [line for line in done.stderr.splitlines() if line.startswith("tta-report:")]
    assert len(warnings) == 1 and warnings[0].startswith(
        f"tta-report: warning: skipping {sweep / '2' / 'metrics.json'}"
    )
    report = (sweep / "report.md").read_text()  # the markdown table; the printed one is compact
    row = next(line for line in report.splitlines() if line.startswith("| none"))
    assert "| 2 |" in row and "60.0 ± 14.1" in row  # the two readable runs
    assert "Unfinished runs (1" in done.stdout and "- 3: 3 batches written" in done.stdout
    assert "- 3: 3 batches written" in report


def test_a_stopped_ddp_process_done_with_its_part_is_ended_not_waited_for_forever(tmp_path):
    """A DDP process that had finished its part when the stop came waits at the end's barrier, where no
    signal reaches it (the run hung): its part's lock is free, so it is ended. One whose part is
    locked (a batch under way) is waited for: it stops after its batch."""
    from tta.run_folder import wait_for_stopped_process

    done_part, busy_part = tmp_path / "rank1of3", tmp_path / "rank2of3"
    done_part.mkdir()
    stuck = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    started = time.monotonic()
    wait_for_stopped_process(stuck, done_part)
    assert stuck.returncode == -signal.SIGKILL and time.monotonic() - started < 30
    holder = subprocess.Popen(
        [
            sys.executable,
            "-c",
            f"from tta.run_folder import DirectoryLock; import time; "
            f"DirectoryLock({str(busy_part)!r}).acquire(); print('locked', flush=True); time.sleep(20)",
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert holder.stdout.readline().strip() == "locked"
    finishing = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(2)"])
    wait_for_stopped_process(finishing, busy_part)
    assert finishing.returncode == 0  # waited for, not killed
    holder.kill()
    holder.wait()
