"""Start-up time of the command-line tools: the median wall time of commands that answer
without predicting anything (help, a config error, a report of a finished run).

    python benchmarks/startup_cpu.py                       # this checkout's console scripts
    python benchmarks/startup_cpu.py --bin-dir /other/venv/bin --label before   # another install

Each command runs ``--runs`` times in a fresh process; the table gives the median and the
fastest run in seconds. A finished run for ``tta-report`` is made first (a tiny world run).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

COMMANDS = {
    "tta-predict --help": ["tta-predict", "--help"],
    "tta-predict list": ["tta-predict", "list"],
    "config error (unknown group option)": ["tta-predict", "tta=no_such_method"],
    "config error (seed=abc)": ["tta-predict", "seed=abc"],
    "tta-report on a finished run": ["tta-report", "{run}"],
    "python -c 'import tta.cli'": ["{python}", "-c", "import tta.cli"],
}


def timed(command: list[str], cwd: Path) -> float:
    start = time.perf_counter()
    subprocess.run(command, cwd=cwd, capture_output=True, text=True, timeout=600)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bin-dir", type=Path, default=Path(sys.executable).parent)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--label", default="this checkout")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="tta-startup-"))
    run = work / "finished"
    made = subprocess.run(
        [
            str(args.bin_dir / "tta-predict"),
            "data.domains=[clean]",
            "data.n_per_domain=4",
            "trainer.enable_progress_bar=false",
            f"hydra.run.dir={run}",
        ],
        cwd=work,
        capture_output=True,
        text=True,
        timeout=600,
    )
    if made.returncode != 0:
        sys.exit(f"could not make the finished run: {made.stderr[-2000:]}")
    python = str(args.bin_dir / "python")
    rows = []
    for name, template in COMMANDS.items():
        command = [part.format(run=run, python=python) for part in template]
        command[0] = command[0] if command[0] == python else str(args.bin_dir / command[0])
        times = [timed(command, work) for _ in range(args.runs)]
        rows.append((name, statistics.median(times), min(times)))
    load = os.getloadavg()[0]
    print(f"start-up, {args.label} ({args.bin_dir}); {args.runs} runs each; load average {load:.1f} on "
          f"{os.cpu_count()} cores")  # fmt: skip
    print("| command | median s | fastest s |")
    print("|---|---|---|")
    for name, median, fastest in rows:
        print(f"| {name} | {median:.2f} | {fastest:.2f} |")


if __name__ == "__main__":
    main()
