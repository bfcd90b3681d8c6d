"""``tta-report DIR``: a markdown table and a PNG plot from one run or a multirun directory.

Reads only the ``metrics.json`` files under ``DIR``. Runs that differ only by ``seed`` are
grouped: each cell is the mean over seeds, with the standard deviation when there are several.
Writes ``report.md`` and ``report.png`` into ``DIR`` and prints the table.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

CLEAN = "clean"


def load_runs(directory: Path) -> list[dict[str, Any]]:
    paths = sorted(directory.rglob("metrics.json"))
    if not paths:
        raise FileNotFoundError(f"no metrics.json under {directory}: point tta-report at a run or multirun directory")
    return [json.loads(p.read_text()) for p in paths]


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def group_runs(runs: list[dict[str, Any]]) -> dict[tuple[str, str, str], list[dict[str, Any]]]:
    groups: dict[tuple[str, str, str], list[dict[str, Any]]] = defaultdict(list)
    for run in runs:
        groups[(run["method"], run["model"], run["data"])].append(run)
    return dict(groups)


def shifted_mean(run: dict[str, Any]) -> float | None:
    values = [d["accuracy"] for name, d in run["domains"].items() if name != CLEAN and d["accuracy"] is not None]
    return statistics.fmean(values) if values else None


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per (method, model, data); accuracies in percent, mean ± std over seeds."""
    groups = group_runs(runs)
    domains = list(dict.fromkeys(name for run in runs for name in run["domains"]))
    header = ["method", "model", "data", "seeds", *domains, "shifted mean", "ECE", "ms/sample", "peak MB"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, model, data), members in groups.items():
        cells = [method, model, data, str(len(members))]
        for name in domains:
            values = [r["domains"][name]["accuracy"] for r in members if name in r["domains"]]
            cells.append(_cell(values) if values and None not in values else "-")
        shifted = [v for v in map(shifted_mean, members) if v is not None]
        cells.append(_cell(shifted) if shifted else "-")
        cells.append(_cell([r["ece"] for r in members], scale=1.0, digits=3))
        cells.append(_cell([r["ms_per_sample"] for r in members], scale=1.0, digits=2))
        cells.append(f"{max(r['peak_mem_mb'] for r in members):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: accuracy per domain, one bar per (method, model), mean over seeds."""
    groups = group_runs(runs)
    domains = list(dict.fromkeys(name for run in runs for name in run["domains"]))
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(domains) + 2), 4))
    for k, ((method, model, data), members) in enumerate(groups.items()):
        means = []
        for name in domains:
            values = [r["domains"][name]["accuracy"] for r in members if name in r["domains"]]
            means.append(100 * statistics.fmean(values) if values and None not in values else 0.0)
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(domains))]
        ax.bar(xs, means, width=width, label=f"{method} ({model}, {data})")
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_ylabel("top-1 accuracy (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def report(directory: str | Path) -> str:
    directory = Path(directory)
    runs = load_runs(directory)
    table = markdown_table(runs)
    (directory / "report.md").write_text(table + "\n")
    accuracy_plot(runs, directory / "report.png")
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tta-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a run directory or a multirun directory")
    args = parser.parse_args(argv)
    try:
        print(report(args.directory))
    except FileNotFoundError as error:
        print(f"tta-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    print(f"\nwrote {args.directory / 'report.md'} and {args.directory / 'report.png'}")


if __name__ == "__main__":
    main()
