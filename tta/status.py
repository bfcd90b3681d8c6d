"""Lines that say what a long step of setup is doing, only when it takes long.

Building a model, scanning a data folder, rendering the offline world's scenes or fitting a
set-level method can take from seconds to minutes before the first batch, when no progress bar
shows anything yet. :class:`SlowStep` keeps quiet for steps that end within a few seconds; one
that runs longer gets a line saying what it is doing, then a line with how far it got every
``every`` seconds, and one with its duration when it ends. A background thread writes the lines
while the step holds the main thread (torch releases the interpreter lock in its kernels).
"""

from __future__ import annotations

import logging
import threading
import time
from types import TracebackType

log = logging.getLogger("tta.status")


class SlowStep:
    """``with SlowStep("rendering 3,500 scenes", total=7, unit="domains") as step: ... step.advance()``

    Args:
        what: what the step does, as a phrase ("rendering 3,500 world scenes").
        total: how many units the step has (``None``: unknown, no fraction is shown).
        unit: what a unit is ("domains", "rounds").
        after: seconds of quiet before the first line.
        every: seconds between the lines that follow.
    """

    def __init__(
        self, what: str, total: int | None = None, unit: str = "", after: float = 3.0, every: float = 15.0
    ) -> None:
        self.what, self.total, self.unit, self.after, self.every = what, total, unit, after, every
        self.done, self.note = 0, ""
        self.announced = False
        self._start = 0.0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def advance(self, units: int = 1, note: str = "") -> None:
        """``units`` more units are done; ``note`` (e.g. the last unit's result) is shown beside the count."""
        self.done += units
        self.note = note

    def _progress(self) -> str:
        count = f"{self.done} of {self.total} {self.unit}".strip() if self.total is not None else ""
        return "; ".join(part for part in (count, self.note) if part)

    def _watch(self) -> None:
        if self._stop.wait(self.after):
            return
        self.announced = True
        progress = self._progress()
        log.info("%s ...%s", self.what, f" ({progress})" if progress else "")
        while not self._stop.wait(self.every):
            elapsed = time.perf_counter() - self._start
            progress = self._progress()
            log.info("%s: %.0f s so far%s", self.what, elapsed, f", {progress}" if progress else "")

    def __enter__(self) -> SlowStep:
        self._start = time.perf_counter()
        self._thread = threading.Thread(target=self._watch, name="tta-slow-step", daemon=True)
        self._thread.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, error: BaseException | None, traceback: TracebackType | None
    ) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        if self.announced and kind is None:
            log.info("%s: done in %.1f s", self.what, time.perf_counter() - self._start)
