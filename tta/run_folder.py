"""The run folder: what one run writes, owned by one process at a time, verified before it is resumed.

Plain Python (no Lightning): :class:`tta.callbacks.PredictionWriter` adapts it to Lightning's
hooks, and ``tta-predict`` uses it to lock and check a folder before it writes anything there.

A run folder (or, under DDP, each process's ``parts/rank<r>of<W>/``) holds

- ``predictions.csv`` and ``timing.csv``: rows appended batch by batch;
- ``progress.json``: the run's settings, and per finished batch its row count and the size
  and SHA-256 of its bytes in each CSV; rewritten atomically (temporary file, then rename)
  after every batch, so it always describes whole batches;
- ``run.lock``: an exclusive ``flock`` held by the process that writes the folder, with its PID
  and host. The lock belongs to the open file, so it ends with the process, however it ends;
- ``stream_state-<batches>.safetensors`` (online methods only): the methods' state after that
  many finished batches, written atomically before the ``progress.json`` that names it (with its
  size, SHA-256 and batch count); the one before is then removed. A state need not be saved with
  every batch (a large one is saved less often, see ``tta.callbacks.writer``): a resume then
  starts after the state's batches, and the rows after them are dropped and redone, the same.

On resume the CSVs are checked against ``progress.json`` batch by batch, and the stream state
against its recorded checksum, before anything is written. Bytes after the last recorded batch
(rows of a batch that a kill cut short), rows after the last saved stream state, and stream
states that ``progress.json`` does not name are the one thing repaired: they are dropped.
Anything else that does not verify stops the run with a :class:`RunFolderError` naming the file
and the fix; such files are never cut or padded.
"""

from __future__ import annotations

import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import os
import signal
import socket
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

PREDICTIONS, TIMING, PROGRESS, LOCK = "predictions.csv", "timing.csv", "progress.json", "run.lock"
TIMING_COLUMNS = ("index", "ms", "adapt_ms")
#: Layout version of ``progress.json``; a folder written with another one is refused.
PROGRESS_FORMAT = 3  # 3: the run key holds the inputs' fingerprints (weights, data files)
#: How many undecodable image paths a run keeps to show at its end.
SHOWN_SKIPPED_PATHS = 5


class RunFolderError(ValueError):
    """A run folder that cannot be used as it is; the message names the file and the fix.

    ``resumable``: the finished batches are kept and a rerun resumes after them (a full disk),
    so ``tta-predict`` adds the command that does so.
    """

    def __init__(self, message: str, resumable: bool = False) -> None:
        super().__init__(message)
        self.resumable = resumable


class RunStopped(Exception):
    """The run stopped on a signal after its last whole batch, with every finished row written.

    ``exit_code`` is the shell's convention for a process ended by the signal (128 + its number:
    143 for SIGTERM, 130 for SIGINT).
    """

    def __init__(self, received: signal.Signals, done: int, total: int) -> None:
        self.received, self.done, self.total = received, done, total
        self.exit_code = 128 + int(received)
        super().__init__(
            f"stopped by {received.name} after batch {done} of {total}; rerun with the same settings and "
            "output directory to resume"
        )


class Interrupted(BaseException):
    """SIGINT or SIGTERM outside the batch loop (start-up, setup, the end of a run), raised by the
    handlers of :func:`raise_on_stop_signals`. A ``BaseException`` like ``KeyboardInterrupt``, so
    that no ``except Exception`` swallows it, but not one: Lightning turns a ``KeyboardInterrupt``
    into a silent ``exit(1)``."""

    def __init__(self, received: signal.Signals) -> None:
        super().__init__(received.name)
        self.received = received
        self.exit_code = 128 + int(received)


def _raise_interrupted(signum: int, frame: object) -> None:
    raise Interrupted(signal.Signals(signum))


def raise_on_stop_signals() -> None:
    """From now on SIGTERM and SIGINT raise :class:`Interrupted` in the main thread (where a run
    is not in its batch loop, whose :class:`StopSignals` stop it after the current batch)."""
    if threading.current_thread() is threading.main_thread():
        for signum in StopSignals.SIGNALS:
            signal.signal(signum, _raise_interrupted)


def _reason(error: OSError) -> str:
    return error.strerror or str(error)


def _cannot_write(path: Path, error: OSError) -> RunFolderError:
    return RunFolderError(
        f"cannot write {path} ({_reason(error)}): free disk space or make the folder writable, then rerun to "
        "resume (finished batches are kept)",
        resumable=True,
    )


def make_directory(directory: Path) -> None:
    """Create ``directory`` (and its parents) and check that files can be created in it, or fail
    with one line that names what is in the way."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=directory):
            pass
    except (FileExistsError, NotADirectoryError):
        blocking = next((p for p in (directory, *directory.parents) if p.exists() and not p.is_dir()), directory)
        raise RunFolderError(
            f"cannot use {directory} as a run directory: {blocking} is a file, not a folder; choose another directory"
        ) from None
    except OSError as error:
        raise RunFolderError(
            f"cannot write in the run directory {directory} ({_reason(error)}): make it writable, or choose "
            "another directory"
        ) from None


def write_atomic(path: Path, data: str | bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, then rename it over ``path``: a reader
    (or a kill) sees the old file or the new one, never half of one."""
    temporary = path.with_name(path.name + ".tmp")
    try:
        temporary.write_bytes(data.encode() if isinstance(data, str) else data)
        os.replace(temporary, path)
    except OSError as error:
        raise _cannot_write(path, error) from None


# --- the lock ---------------------------------------------------------------------------------

#: Locks this process holds: resolved directory -> [lock file, holders]. The lock is re-entrant
#: within a process (tta-predict takes it before the config record, the writer again inside).
_HELD: dict[str, list[Any]] = {}
_HELD_GUARD = threading.Lock()


def _try_lock(lock_file: Any) -> bool:
    """Take the exclusive lock if it is free; False while another process holds it."""
    try:
        fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    return True


class DirectoryLock:
    """An exclusive OS lock (``flock``) on a run directory, for as long as this object holds it.

    A second process that asks for it gets a :class:`RunFolderError` at once (or after waiting
    ``wait_s`` seconds for the holder to let go), naming the PID and host that hold it. The
    kernel drops the lock when the holder's process ends, even on ``kill -9``, so there is no
    stale lock to clean up.
    """

    def __init__(self, directory: str | Path, wait_s: float = 0.0) -> None:
        self.directory = Path(directory)
        self.wait_s = wait_s
        self._key: str | None = None

    def acquire(self) -> DirectoryLock:
        make_directory(self.directory)
        key = os.path.realpath(self.directory)
        with _HELD_GUARD:
            if key in _HELD:
                _HELD[key][1] += 1
                self._key = key
                return self
            path = self.directory / LOCK
            try:
                lock_file = open(path, "a+")  # noqa: SIM115 (held until release)
            except OSError as error:
                raise _cannot_write(path, error) from None
            deadline = time.monotonic() + self.wait_s
            try:
                while not _try_lock(lock_file):
                    if time.monotonic() >= deadline:
                        raise BlockingIOError(errno.EWOULDBLOCK, "held by another process")
                    time.sleep(0.2)
            except OSError as error:
                lock_file.seek(0)
                holder = lock_file.read().strip()
                lock_file.close()
                if error.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                    raise RunFolderError(
                        f"cannot lock {path} ({_reason(error)}): put the run directory on a file system with file locks"
                    ) from None
                raise RunFolderError(
                    f"{self.directory} is in use by another run ({holder or 'PID unknown'}): wait for it to "
                    "finish (or stop it), or write to another directory"
                ) from None
            try:
                lock_file.seek(0)
                lock_file.truncate()
                lock_file.write(f"PID {os.getpid()} on {socket.gethostname()}\n")
                lock_file.flush()
            except OSError as error:
                lock_file.close()
                raise _cannot_write(path, error) from None
            _HELD[key] = [lock_file, 1]
            self._key = key
        return self

    def release(self) -> None:
        if self._key is None:
            return
        with _HELD_GUARD:
            held = _HELD[self._key]
            held[1] -= 1
            if held[1] == 0:
                held[0].close()  # closing the file releases the flock
                del _HELD[self._key]
        self._key = None

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc_info: object) -> None:
        self.release()


# --- what a run is ------------------------------------------------------------------------------


#: Options of tta-predict's config that change what is shown, where results are also logged or
#: how fast they come, not the rows: left out of the run key (older runs' recorded configs hold
#: them). ``*`` stands for any key (every callback's view store).
DISPLAY_OPTIONS: tuple[tuple[str, ...], ...] = (
    ("print_table",),
    ("logger",),
    ("trainer", "enable_progress_bar"),
    ("view_store",),
    ("tta", "callbacks", "*", "view_store"),
)


def drop_display_options(config: dict[str, Any]) -> dict[str, Any]:
    """``config`` (a plain resolved config) without :data:`DISPLAY_OPTIONS`, changed in place."""
    for path in DISPLAY_OPTIONS:
        _drop(config, path)
    return config


def _drop(node: Any, path: tuple[str, ...]) -> None:
    if not isinstance(node, dict):
        return
    name, *rest = path
    if not rest:
        node.pop(name, None)
        return
    for child in node.values() if name == "*" else [node.get(name)]:
        _drop(child, tuple(rest))


def differences(recorded: Any, current: Any, prefix: str = "") -> list[str]:
    """Dotted names of the settings that differ between two runs' plain-data settings."""
    if isinstance(recorded, dict) and isinstance(current, dict):
        names = list(dict.fromkeys([*recorded, *current]))
        return [
            found
            for name in names
            for found in differences(recorded.get(name, "<unset>"), current.get(name, "<unset>"), f"{prefix}{name}.")
        ]
    return [] if recorded == current else [prefix.rstrip(".") or "settings"]


def _setting_value(settings: Any, name: str) -> str:
    for part in name.split("."):
        settings = settings.get(part, "<unset>") if isinstance(settings, dict) else "<unset>"
    return json.dumps(settings)


#: What to do about a difference, by the first part of its name (the rest: other settings).
_FIXES = {
    "inputs.weights": "the model's weights are not the ones that run used: restore them, or write to another directory",
    "inputs.data": "the data's files are not the ones that run read (added, removed or changed files): restore "
    "them, or write to another directory",
}


def _describe_differences(recorded: dict[str, Any], current: dict[str, Any]) -> str:
    """One line: the first setting that differs with both values in full, the names of the others,
    and the fix."""
    found = differences(recorded, current)
    first = found[0]
    text = f"{first} is {_setting_value(recorded, first)} there, {_setting_value(current, first)} here"
    if len(found) > 1:
        others = ", ".join(found[1:5]) + (", ..." if len(found) > 5 else "")
        text += f"; {len(found) - 1} more differ: {others}"
    fix = next((fix for prefix, fix in _FIXES.items() if first.startswith(prefix)), None)
    return f"{text}: {fix or 'resume it with the same settings, or write to another directory'}"


# --- one process's files ----------------------------------------------------------------------


def csv_text(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """CSV lines of ``rows`` (values written with ``str``, ``None`` as empty), no header."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    for row in rows:
        writer.writerow({k: "" if v is None else v for k, v in row.items()})
    return buffer.getvalue()


def read_rows(path: str | Path) -> list[dict[str, str]]:
    """The rows of a ``predictions.csv`` or ``timing.csv``, values as written (``str``)."""
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _layout_problem(state: dict[str, Any]) -> str:
    """What is wrong with the layout of a ``progress.json`` (``""``: nothing)."""
    keys = ("run", "columns", "batches", PREDICTIONS, TIMING, "skipped_images", "skipped_paths")
    missing = [key for key in keys if key not in state]
    if missing:
        return f"no {', '.join(missing)}"
    for name in (PREDICTIONS, TIMING):
        extents = state[name]
        if not isinstance(extents, list) or len(extents) != len(state["batches"]):
            return f"{name}: not one record per batch"
        if not all(isinstance(e, list) and len(e) == 2 and isinstance(e[0], int) and e[0] >= 0 for e in extents):
            return f"{name}: a record that is not [bytes, sha256]"
    return ""


def stream_state_name(batches: int) -> str:
    """The file name of the stream state after ``batches`` finished batches."""
    return f"stream_state-{batches:07d}.safetensors"


def _digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()[:16]


def _header(columns: Sequence[str]) -> bytes:
    return (",".join(columns) + "\n").encode()


class RunPart:
    """One process's ``predictions.csv``, ``timing.csv`` and ``progress.json``, appended batch by batch.

    Args:
        directory: the run directory (or a DDP process's part directory).
        run: the run's settings, plain data: a folder holding another run's rows is refused.
        columns: the columns of ``predictions.csv``; ``None``: those recorded (a check before the
            model that declares them is built).
        unchecked: top-level entries of the recorded settings left out of the comparison (a check
            before the inputs they describe are known: ``run`` has none of them).
    """

    def __init__(
        self, directory: str | Path, run: dict[str, Any], columns: Sequence[str] | None, unchecked: Sequence[str] = ()
    ) -> None:
        self.directory, self.run, self.unchecked = Path(directory), run, tuple(unchecked)
        self.columns = None if columns is None else tuple(columns)
        self.predictions = self.directory / PREDICTIONS
        self.timing = self.directory / TIMING
        self.progress = self.directory / PROGRESS
        self.batches: list[int] = []  # rows per finished batch
        self.extents: dict[str, list[list[Any]]] = {PREDICTIONS: [], TIMING: []}  # per batch [bytes, sha256]
        self.skipped_images = 0  # images left out of the finished batches (undecodable), all sessions
        self.skipped_paths: list[str] = []  # the first SHOWN_SKIPPED_PATHS of them
        self.peak_mem_mb: float | None = None  # this session's, once closed
        #: The online methods' state after the finished batches (verified bytes; ``None``: none saved).
        self.stream_state: bytes | None = None
        #: The saved state's record in progress.json: file, bytes, sha256, and the batches and skipped
        #: images it follows (what a resume rolls back to).
        self._stream_record: dict[str, Any] | None = None
        self._lock: DirectoryLock | None = None
        self._files: dict[str, Any] = {}

    # -- reading and verifying, no writes --

    def read_state(self) -> dict[str, Any] | None:
        """``progress.json`` as written, checked to be this run's; ``None`` for a folder without a run."""
        if not self.progress.is_file():
            leftovers = [p for p in (self.predictions, self.timing) if p.exists()]
            if leftovers:
                raise RunFolderError(
                    f"{leftovers[0]} has no {PROGRESS} beside it, so its rows cannot be verified or resumed: "
                    f"move it aside, or write to another directory"
                )
            return None
        try:
            state = json.loads(self.progress.read_text())
            if not isinstance(state, dict):
                raise ValueError("not a JSON object")
        except (ValueError, UnicodeDecodeError) as error:
            raise RunFolderError(
                f"{self.progress} is damaged ({error}): move {self.directory} aside (or delete it) and rerun "
                "to start over"
            ) from None
        except OSError as error:
            raise RunFolderError(f"cannot read {self.progress} ({_reason(error)})") from None
        if state.get("format") != PROGRESS_FORMAT:
            raise RunFolderError(
                f"{self.progress} was written by another version of tta (format {state.get('format')}, this one "
                f"reads {PROGRESS_FORMAT}): finish it with that version, or move {self.directory} aside"
            )
        problem = _layout_problem(state)
        if problem:
            raise RunFolderError(
                f"{self.progress} is damaged ({problem}): move {self.directory} aside (or delete it) and rerun "
                "to start over"
            )
        recorded = (
            {k: v for k, v in state["run"].items() if k not in self.unchecked}
            if isinstance(state["run"], dict)
            else state["run"]
        )
        if recorded != self.run:
            raise RunFolderError(
                f"{self.directory} holds the results of a different run: {_describe_differences(recorded, self.run)}"
            )
        if self.columns is None:
            self.columns = tuple(state["columns"])
        elif tuple(state["columns"]) != self.columns:
            raise RunFolderError(
                f"{self.predictions} has the columns {state['columns']}, not {list(self.columns)}: "
                "write to another directory"
            )
        return state

    def verified_ends(self, state: dict[str, Any]) -> dict[str, int]:
        """Per CSV, the size of its verified part (header and finished batches); raises
        :class:`RunFolderError` when a finished batch's bytes are not the ones recorded."""
        ends = {}
        for name, columns in ((PREDICTIONS, self.columns), (TIMING, TIMING_COLUMNS)):
            path, header, extents = self.directory / name, _header(columns), state[name]
            try:
                data = path.read_bytes()
            except FileNotFoundError:
                if extents:
                    raise RunFolderError(
                        f"{path} is missing but {self.progress} records {len(extents)} finished batches: restore "
                        f"the file, or move {self.directory} aside and rerun to start over"
                    ) from None
                data = b""
            except OSError as error:
                raise RunFolderError(f"cannot read {path} ({_reason(error)})") from None
            if not extents and header.startswith(data):  # a kill between progress.json and the header
                ends[name] = 0
                continue
            position = len(header)
            if data[:position] != header:
                self._mismatch(path, "its header line differs")
            for k, (size, digest) in enumerate(extents):
                chunk = data[position : position + size]
                if len(chunk) < size or _digest(chunk) != digest:
                    self._mismatch(path, f"batch {k + 1} of the {len(extents)} recorded differs")
                position += size
            ends[name] = position
        return ends

    def verified_stream_state(self, state: dict[str, Any]) -> bytes | None:
        """The stream state ``progress.json`` names, checked against its size and SHA-256 (``None``:
        the run saved none)."""
        record = state.get("stream_state")
        if record is None:
            return None
        keys = {"file", "bytes", "sha256", "batches", "skipped_images", "skipped_paths"}
        if not (isinstance(record, dict) and keys <= set(record) and 0 <= record["batches"] <= len(state["batches"])):
            raise RunFolderError(
                f"{self.progress} is damaged (stream_state: not a record of a saved state): move {self.directory} "
                "aside (or delete it) and rerun to start over"
            )
        path = self.directory / Path(record["file"]).name
        try:
            data = path.read_bytes()
        except OSError as error:
            raise RunFolderError(
                f"cannot read {path} ({_reason(error)}), the online methods' state after {record['batches']} "
                f"finished batches: restore it, or move {self.directory} aside and rerun to start over"
            ) from None
        if len(data) != record["bytes"] or _digest(data) != record["sha256"]:
            raise RunFolderError(
                f"{path} does not match {self.progress} (the online methods' state changed since it was saved): "
                f"restore it, or move {self.directory} aside and rerun to start over"
            )
        return data

    def _roll_back_to_stream_state(self, ends: dict[str, int]) -> None:
        """Forget the batches after the saved stream state (their rows are dropped and redone)."""
        kept = self._stream_record["batches"]
        if kept == len(self.batches):
            return
        for name, columns in ((PREDICTIONS, self.columns), (TIMING, TIMING_COLUMNS)):
            self.extents[name] = self.extents[name][:kept]
            ends[name] = len(_header(columns)) + sum(size for size, _ in self.extents[name])
        self.batches = self.batches[:kept]
        self.skipped_images = self._stream_record["skipped_images"]
        self.skipped_paths = list(self._stream_record["skipped_paths"])

    def _remove_stale_stream_states(self) -> None:
        """Remove the stream states that ``progress.json`` does not name (one a kill left half-done)."""
        keep = self._stream_record["file"] if self._stream_record else None
        for path in self.directory.glob("stream_state-*.safetensors*"):
            if path.name != keep:
                with contextlib.suppress(OSError):
                    path.unlink()

    def _mismatch(self, path: Path, what: str) -> None:
        raise RunFolderError(
            f"{path} does not match {self.progress} ({what}: rows changed, deleted or inserted): move "
            f"{self.directory} aside and rerun to start over, or restore the file"
        )

    def check(self) -> int:
        """Verify the folder for this run without writing; returns the number of finished batches."""
        state = self.read_state()
        if state is None:
            return 0
        self.verified_ends(state)
        return len(state["batches"])

    # -- writing --

    def open(self, wait_s: float = 0.0) -> int:
        """Lock (waiting up to ``wait_s`` seconds for a holder to let go), verify, drop a cut-off
        batch's rows, and open for appending; returns the finished batches."""
        self._lock = DirectoryLock(self.directory, wait_s).acquire()
        try:
            state = self.read_state()
            ends = self.verified_ends(state) if state is not None else {PREDICTIONS: 0, TIMING: 0}
            if state is not None:
                self.batches = list(state["batches"])
                self.extents = {name: list(state[name]) for name in (PREDICTIONS, TIMING)}
                self.skipped_images, self.skipped_paths = int(state["skipped_images"]), list(state["skipped_paths"])
                self.stream_state = self.verified_stream_state(state)
                self._stream_record = state.get("stream_state")
                if self._stream_record is not None:
                    self._roll_back_to_stream_state(ends)
            self._remove_stale_stream_states()
            self.save()  # first, so that a fresh folder is recognised as this run's from now on
            for name, columns in ((PREDICTIONS, self.columns), (TIMING, TIMING_COLUMNS)):
                path = self.directory / name
                try:
                    if ends[name] == 0:
                        path.write_bytes(_header(columns))
                    elif path.stat().st_size > ends[name]:
                        with open(path, "r+b") as f:
                            f.truncate(ends[name])  # only the unverified rows after the last finished batch
                    # kept open for the whole run, closed in close()
                    self._files[name] = open(path, "ab")  # noqa: SIM115
                except OSError as error:
                    raise _cannot_write(path, error) from None
        except BaseException:
            self.abort()
            raise
        return len(self.batches)

    def append(
        self,
        predictions: Sequence[dict[str, Any]],
        timing: Sequence[dict[str, Any]],
        skipped_images: int = 0,
        skipped_paths: Sequence[str] = (),
        stream_state: bytes | None = None,
    ) -> None:
        """Append one finished batch: its rows for each CSV, how many images it left out
        (undecodable) and their paths where known, and the online methods' state after it
        (``stream_state``, bytes; ``None``: the state saved before stays the one a resume starts
        from). Written and flushed, then recorded."""
        for name, rows, columns in ((PREDICTIONS, predictions, self.columns), (TIMING, timing, TIMING_COLUMNS)):
            data = csv_text(rows, columns).encode()
            try:
                self._files[name].write(data)
                self._files[name].flush()
            except OSError as error:
                raise _cannot_write(self.directory / name, error) from None
            self.extents[name].append([len(data), _digest(data)])
        self.batches.append(len(predictions))
        self.skipped_images += skipped_images
        self.skipped_paths = [*self.skipped_paths, *skipped_paths][:SHOWN_SKIPPED_PATHS]
        previous = self._stream_record
        if stream_state is not None:
            name = stream_state_name(len(self.batches))
            write_atomic(self.directory / name, stream_state)
            self.stream_state = stream_state
            self._stream_record = {
                "file": name,
                "bytes": len(stream_state),
                "sha256": _digest(stream_state),
                "batches": len(self.batches),
                "skipped_images": self.skipped_images,
                "skipped_paths": self.skipped_paths,
            }
        self.save()
        if previous is not None and previous != self._stream_record:
            with contextlib.suppress(OSError):  # a leftover is removed at the next open
                (self.directory / previous["file"]).unlink()

    def save(self) -> None:
        write_atomic(
            self.progress,
            json.dumps(
                {
                    "format": PROGRESS_FORMAT,
                    "run": self.run,
                    "columns": list(self.columns),
                    "batches": self.batches,
                    PREDICTIONS: self.extents[PREDICTIONS],
                    TIMING: self.extents[TIMING],
                    "skipped_images": self.skipped_images,
                    "skipped_paths": self.skipped_paths,
                    "peak_mem_mb": self.peak_mem_mb,
                    "stream_state": self._stream_record,
                }
            )
            + "\n",
        )

    def close(self, peak_mem_mb: float) -> None:
        """The end of this session: record its peak memory, close the files, release the lock."""
        try:
            self.peak_mem_mb = peak_mem_mb
            self.save()
        finally:
            self.abort()

    def abort(self) -> None:
        """Close the files and release the lock without writing anything more (after an error or a stop)."""
        for f in self._files.values():
            # a full disk refusing buffered bytes: they were never recorded as finished
            with contextlib.suppress(OSError):
                f.close()
        self._files = {}
        if self._lock is not None:
            self._lock.release()
            self._lock = None


def part_directory(directory: Path, rank: int, world_size: int) -> Path:
    """The folder of DDP process ``rank``'s part of the run in ``directory``."""
    return directory / "parts" / f"rank{rank}of{world_size}"


def wait_for_stopped_process(process: Any, part: Path, poll_s: float = 0.2) -> None:
    """Wait for a DDP process that was told to stop (``process``: a ``subprocess.Popen``; ``part``:
    its part folder). It stops after its current batch; but a process that had already finished its
    part waits for this one at the end's barrier, a C call that no signal interrupts. Its part's
    lock then is free (held from the first batch to the closing of the part): it is ended at once,
    losing nothing (its part is closed; one that had not started loses nothing either)."""
    while process.poll() is None:
        try:
            DirectoryLock(part).acquire().release()
        except RunFolderError:  # held: a batch is under way; it stops after it
            time.sleep(poll_s)
            continue
        process.kill()
        process.wait()


def _part_folders(directory: Path) -> list[Path]:
    """The folders that hold a run's files: its DDP parts, or the run directory itself."""
    parts = directory / "parts"
    return sorted(parts.glob("rank*of*")) if parts.is_dir() else [directory]


def check_run_directory(directory: str | Path, run: dict[str, Any], unchecked: Sequence[str] = ()) -> None:
    """Refuse, without writing anything, a directory that holds another run or damaged files:
    what ``tta-predict`` checks before it builds the model (``unchecked``: the entries of the run
    key not known yet, see :class:`RunPart`) and again, with the whole key, before it writes its
    config record. The columns are checked when the writer opens the folder."""
    for folder in _part_folders(Path(directory)):
        part = RunPart(folder, run, None, unchecked)
        state = part.read_state()
        if state is not None:
            part.verified_ends(state)


def finished_batches(directory: str | Path) -> int | None:
    """How many batches ``directory`` (all its DDP parts) records as finished, read without checks:
    for messages and reports, never for resuming. ``None`` where a ``progress.json`` is unreadable."""
    done = 0
    for folder in _part_folders(Path(directory)):
        progress = folder / PROGRESS
        if not progress.exists():
            continue
        try:
            done += len(json.loads(progress.read_text())["batches"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return done


def merge_parts(directory: str | Path, run: dict[str, Any], columns: Sequence[str], world_size: int) -> list[dict]:
    """Write ``predictions.csv`` and ``timing.csv`` of ``directory`` from its DDP parts, in stream
    order (global batch ``g`` came from rank ``g % world_size``); returns the parts' states."""
    directory = Path(directory)
    parts = [RunPart(part_directory(directory, r, world_size), run, columns) for r in range(world_size)]
    states = []
    for part in parts:
        state = part.read_state()
        if state is None:
            raise RunFolderError(f"{part.progress} is missing: rerun the same command to redo that process's part")
        part.verified_ends(state)
        states.append(state)
    total = sum(len(state["batches"]) for state in states)
    for name, header in ((PREDICTIONS, _header(columns)), (TIMING, _header(TIMING_COLUMNS))):
        data = [(part.directory / name).read_bytes() for part in parts]
        cursors = [len(header)] * world_size
        merged = [header]
        for g in range(total):
            rank, local = g % world_size, g // world_size
            size = states[rank][name][local][0]
            merged.append(data[rank][cursors[rank] : cursors[rank] + size])
            cursors[rank] += size
        temporary = directory / (name + ".tmp")
        try:
            temporary.write_bytes(b"".join(merged))
            os.replace(temporary, directory / name)
        except OSError as error:
            raise _cannot_write(directory / name, error) from None
    return states


# --- stop signals -------------------------------------------------------------------------------


class StopSignals:
    """While installed, SIGTERM and SIGINT ask the run to stop after its current batch.

    The first such signal is recorded in ``received`` (and passed to ``forward``, e.g. to tell
    other processes of the run); the run checks it between batches. A second SIGINT (Ctrl-C
    pressed again) raises ``stop_now()`` at once (default ``KeyboardInterrupt``). Signal
    handlers can only be set from the main thread; elsewhere :meth:`install` does nothing.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(
        self,
        forward: Callable[[signal.Signals], None] | None = None,
        stop_now: Callable[[], BaseException] = KeyboardInterrupt,
    ) -> None:
        self.forward, self.stop_now = forward, stop_now
        self.received: signal.Signals | None = None
        self._previous: dict[signal.Signals, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.received = None
        for signum in self.SIGNALS:
            self._previous[signum] = signal.getsignal(signum)
            signal.signal(signum, self._handle)

    def _handle(self, signum: int, frame: object) -> None:
        if self.received is not None:
            if signum == signal.SIGINT:
                raise self.stop_now()
            return
        self.received = signal.Signals(signum)
        if self.forward is not None:
            self.forward(self.received)

    def restore(self) -> None:
        """Put back the handlers found at :meth:`install`, where ours is still the one installed."""
        for signum, previous in self._previous.items():
            # None: a handler set outside Python, which cannot be put back from here
            if signal.getsignal(signum) == self._handle and previous is not None:
                signal.signal(signum, previous)
        self._previous = {}
