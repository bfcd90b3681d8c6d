"""``tta-report DIR``: a markdown table and a PNG plot from one run or a multirun directory.

Reads only the ``metrics.json`` files under ``DIR``. Runs that differ only by ``seed`` are
grouped: each cell is the mean over seeds, with the standard deviation when there are several.
Writes ``report.md`` and ``report.png`` into ``DIR`` and prints the table.

``--compare-published`` also puts each run beside the published numbers of the protocol card
it ran (the ``published`` block of its ``experiment`` config, read from the run's
``.hydra/config.yaml``): run accuracy, published accuracy and the difference, in points.
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
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(domains) + 2) + 3, 4))
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
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def published_rows(directory: Path) -> list[list[str]]:
    """``[card method, model, data, seed, run %, published %, difference]`` for every run under
    ``directory`` whose Hydra config carries a ``published`` block."""
    from omegaconf import OmegaConf

    rows = []
    for path in sorted(directory.rglob("metrics.json")):
        config = path.parent / ".hydra" / "config.yaml"
        published = OmegaConf.load(config).get("published") if config.is_file() else None
        if published is None:
            continue
        run = json.loads(path.read_text())
        reference = published.accuracy.get(run["data"])
        ours = None if run["accuracy"] is None else 100 * run["accuracy"]
        cells = [f"{reference:.2f}" if reference is not None else "not published",
                 f"{ours - reference:+.2f}" if reference is not None and ours is not None else "-"]
        rows.append([run["method"], run["model"], run["data"], str(run["seed"]),
                     "-" if ours is None else f"{ours:.2f}", *cells])
    if not rows:
        raise FileNotFoundError(f"no run under {directory} has a published block: run an experiment= protocol "
                                "card (configs/experiment) and point tta-report at its run directory")
    return rows


def published_table(directory: str | Path) -> str:
    """Markdown: each run beside its protocol card's published accuracy (%) and the difference."""
    header = ["method", "model", "data", "seed", "run", "published", "difference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in published_rows(Path(directory))]
    return "\n".join(lines)


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
    parser.add_argument("--compare-published", action="store_true",
                        help="also compare each run with its protocol card's published numbers (published.md)")
    args = parser.parse_args(argv)
    try:
        print(report(args.directory))
        if args.compare_published:
            table = published_table(args.directory)
            (args.directory / "published.md").write_text(table + "\n")
            print("\n" + table)
    except FileNotFoundError as error:
        print(f"tta-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    written = ["report.md", "report.png", *(["published.md"] if args.compare_published else [])]
    print(f"\nwrote {', '.join(str(args.directory / name) for name in written)}")


if __name__ == "__main__":
    main()
