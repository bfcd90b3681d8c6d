"""What ``tta-predict`` says in the first hour (issue 22): the command that resumes a stopped run,
a line for slow setup, one line for a stop signal at any moment, the closest keys for a typo,
the extra a logger needs, a note for batch methods on an i.i.d. stream, and DDP under a kill.
Each goes through the real entry point (``tta-predict`` in a subprocess, or its functions)."""

from __future__ import annotations

import json
import os
import re
import shlex
import signal
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from conftest import ENV, RUN, batches_done, console_script, one_line_error, start, tta_predict, wait_for_batches

QUIET = ["trainer.enable_progress_bar=false", "print_table=false"]


def read_until(process: subprocess.Popen, text: str, timeout: float = 600) -> list[str]:
    """stdout lines of ``process`` up to the first that holds ``text``."""
    lines, deadline = [], time.monotonic() + timeout
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        assert line or process.poll() is None, f"ended before {text!r}: {lines} {process.stderr.read()[-2000:]}"
        lines.append(line)
        if text in line:
            return lines
    raise AssertionError(f"no {text!r} after {timeout} s: {lines}")


# --- 6: resume as users run it ------------------------------------------------------------------


def test_a_stopped_run_in_a_timestamped_folder_prints_the_command_that_resumes_it(reference, tmp_path):
    """The default run directory is ``outputs/<date>/<time>``: rerunning the same command would start
    over elsewhere, so the stop line gives the command with that folder, and it resumes."""
    process = start(RUN, tmp_path)  # no hydra.run.dir
    run = Path(read_until(process, "run directory:")[-1].split("run directory: ")[1].strip())
    wait_for_batches(run, 2, process)
    process.send_signal(signal.SIGINT)
    _, err = process.communicate(timeout=600)
    assert process.returncode == 130, err[-3000:]
    last = err.strip().splitlines()[-1]
    assert re.fullmatch(r"tta-predict: stopped by SIGINT after batch \d+ of 12; resume with: tta-predict .*", last)
    command = shlex.split(last.split("resume with: ", 1)[1])
    assert command[-1] == f"hydra.run.dir={run.relative_to(tmp_path).as_posix()}" and command[1:-1] == RUN
    done = tta_predict(command[1:], tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming after batch" in done.stdout
    assert (run / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()


# --- 7: say what is happening -------------------------------------------------------------------


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_slow_setup_says_so_and_a_stop_during_it_is_one_line(tmp_path, stop, exit_code):
    """Rendering 3,000 scenes takes several seconds: a line says so (it used to be silent), and a
    stop signal then ends the command with one line (Ctrl-C used to exit 1 in silence; SIGTERM 143)."""
    args = ["data.domains=[clean,noise]", "data.n_per_domain=1500", *QUIET, f"hydra.run.dir={tmp_path / 'run'}"]
    process = start(args, tmp_path)
    read_until(process, "rendering 3,000 world scenes ...")
    process.send_signal(stop)
    out, err = process.communicate(timeout=600)
    assert process.returncode == exit_code, err[-3000:]
    assert "Traceback" not in out + err
    assert err.strip().splitlines() == [
        f"tta-predict: stopped by {stop.name} before any batch was finished; resume with: tta-predict "
        + shlex.join(args[:-1])
        + " hydra.run.dir=run"
    ]


def test_a_stop_signal_during_start_up_is_one_line(tmp_path):
    args = ["data.domains=[clean]", "data.n_per_domain=8", *QUIET, f"hydra.run.dir={tmp_path / 'r'}"]
    process = start(args, tmp_path)
    read_until(process, "run directory:")  # torch and Lightning are being imported now
    process.send_signal(signal.SIGTERM)
    out, err = process.communicate(timeout=600)
    assert process.returncode == 143, err[-3000:]
    assert "Traceback" not in out + err and len(err.strip().splitlines()) == 1
    assert err.startswith("tta-predict: stopped by SIGTERM before any batch was finished; resume with: ")


def test_after_the_last_batch_a_stop_signal_still_ends_in_one_line(shipped_vlm, tmp_path):
    """Lightning puts back the handlers it found when predict ends: tta-predict's, so that a
    SIGTERM while the metrics and the table are written is one line too (it used to exit 143 in
    silence); the line then says where the results are."""
    import pytorch_lightning as pl

    from tta.callbacks import PredictionWriter
    from tta.cli import stopped_message
    from tta.datamodules import WorldDataModule
    from tta.run_folder import Interrupted, raise_on_stop_signals
    from tta.tasks import ZeroShotClassifier

    before = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        raise_on_stop_signals()
        trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[PredictionWriter(tmp_path, seed=0)])
        data = WorldDataModule(domains=["clean"], n_per_domain=4, batch_size=4)
        trainer.predict(ZeroShotClassifier(shipped_vlm), datamodule=data, return_predictions=False)
        with pytest.raises(Interrupted) as info:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(1)
    finally:
        for signum, handler in before.items():
            signal.signal(signum, handler)
    assert info.value.exit_code == 143
    message = stopped_message(info.value.received, tmp_path)
    assert message == f"stopped by SIGTERM after the run had finished; its results are in {tmp_path}"


def test_a_mistyped_key_gets_the_closest_keys_and_a_missing_logger_its_extra(tmp_path):
    # tta-predict's own entry function, in a process where tensorboard (and tensorboardX) cannot be imported
    without_tensorboard = (
        "import sys; sys.modules['tensorboard'] = sys.modules['tensorboardX'] = None; "
        "from tta.cli import predict; sys.argv[0] = 'tta-predict'; predict()"
    )
    commands = {
        "typo": [str(console_script("tta-predict")), "data.n_per_domian=5", f"hydra.run.dir={tmp_path / 'typo'}"],
        "logger": [
            *(sys.executable, "-c", without_tensorboard),
            *("logger=tensorboard", "data.n_per_domain=4", f"hydra.run.dir={tmp_path / 'logger'}"),
        ],
    }

    def run(command: list[str]) -> subprocess.CompletedProcess:
        return subprocess.run(command, cwd=tmp_path, env=ENV, capture_output=True, text=True, timeout=600)

    with ThreadPoolExecutor(max_workers=2) as pool:
        done = dict(zip(commands, pool.map(run, commands.values())))
    one_line_error(done["typo"], "unknown key data.n_per_domian: did you mean data.n_per_domain?")
    one_line_error(done["logger"], "logger=tensorboard needs the package tensorboard", "pip install 'tta[loggers]'")
    assert [p.name for p in (tmp_path / "logger").iterdir()] == ["run.lock"]


def test_a_batch_method_on_an_iid_stream_gets_a_note(tmp_path):
    def run(stream: str) -> subprocess.CompletedProcess:
        args = ["tta=lame", "data.domains=[clean]", "data.n_per_domain=8", f"data.stream={stream}", *QUIET,
                f"hydra.run.dir={tmp_path / stream}"]  # fmt: skip
        return tta_predict(args, tmp_path)

    with ThreadPoolExecutor(max_workers=2) as pool:
        iid, ordered = pool.map(run, ["iid", "sorted"])
    assert iid.returncode == ordered.returncode == 0, iid.stderr[-2000:] + ordered.stderr[-2000:]
    notes = [line for line in iid.stdout.splitlines() if line.startswith("note: lame")]
    assert len(notes) == 1 and "data.stream" in notes[0] and "non-i.i.d." in notes[0]
    assert "note: lame" not in ordered.stdout


# --- 8: DDP under a kill ------------------------------------------------------------------------


def process_ended(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/status").read_text()
    except FileNotFoundError:
        return True
    return "\nState:\tZ" in state  # a zombie no one has reaped yet has ended too


def test_killing_the_launching_process_of_ddp_stops_the_others_and_the_rerun_resumes(reference, tmp_path):
    """kill -9 of the process that started DDP: the process Lightning started stops after its batch
    (it used to run on alone), and the rerun resumes without a traceback to the one-device rows."""
    run = tmp_path / "run"
    args = [*RUN, "trainer=ddp_cpu", f"hydra.run.dir={run}"]
    process = start(args, tmp_path)
    part = run / "parts" / "rank1of2"
    wait_for_batches(part, 1, process)
    rank1 = int(re.search(r"PID (\d+)", (part / "run.lock").read_text()).group(1))
    process.kill()
    process.communicate(timeout=60)
    deadline = time.monotonic() + 120
    while not process_ended(rank1):
        assert time.monotonic() < deadline, "the DDP process Lightning started runs on alone"
        time.sleep(0.2)
    assert batches_done(part) < 6  # it stopped, rather than finishing its 6 batches alone
    done = tta_predict(args, tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "Traceback" not in done.stdout + done.stderr
    assert (run / "predictions.csv").read_bytes() == (reference / "predictions.csv").read_bytes()
    assert json.loads((run / "metrics.json").read_text())["n"] == 48
