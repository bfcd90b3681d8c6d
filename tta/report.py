"""``tta-report DIR``: markdown tables and PNG plots from one run or a multirun directory.

Reads the ``metrics.json`` files under ``DIR`` (and, for reliability diagrams, the
``predictions.csv`` beside them). Runs that differ only by ``seed`` are grouped: each cell is
the mean over seeds, with the standard deviation when there are several; runs over several
stream orders (``data.stream``) are grouped per stream. Writes into ``DIR``:

- ``report.md``: one row per method (and model, data, severity), one column per domain, then
  the mean over the shifted domains, ECE, ms per sample and peak memory;
- ``report.png``: the per-domain scores as grouped bars;
- ``accuracy_vs_severity.png``: mean shifted score against ``data.severity``, one line per
  method (when the runs cover two severities or more);
- ``reliability.png``: a reliability diagram per method, its runs' rows pooled (classifiers).

The score is the task's headline metric (``headline`` in ``metrics.json``; ``accuracy`` for
classifiers).

A ``metrics.json`` that cannot be read (damaged, or not written by ``tta-predict``) is skipped
with a warning naming it. Runs that have started but not finished (a ``progress.json`` without
``metrics.json``) are listed under the table, with the batches they have written.

``--compare-published`` also puts each run beside the published numbers of the protocol card
it ran (the ``published`` block of its ``experiment`` config, read from the run's
``.hydra/config.yaml``): run accuracy, published accuracy and the difference, in points.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tta.metrics.calibration import reliability

CLEAN = "clean"
Group = tuple[str, str, str, Any]  # method, model, data, severity (None if the data has none)


#: Keys of every metrics.json that tta-predict writes (tta.callbacks.PredictionWriter).
REQUIRED_KEYS = ("method", "model", "data", "domains", "ms_per_sample", "peak_mem_mb")


def read_metrics(path: Path) -> dict[str, Any] | None:
    """One run's ``metrics.json``; ``None``, with a warning on stderr naming the file, when it
    cannot be read or lacks what tta-predict writes."""
    try:
        run = json.loads(path.read_text())
        if not isinstance(run, dict):
            raise ValueError("not a JSON object")
        missing = [key for key in REQUIRED_KEYS if key not in run]
        if missing:
            raise ValueError(f"no {', '.join(missing)}")
    except (OSError, UnicodeDecodeError, ValueError) as error:
        print(
            f"tta-report: warning: skipping {path} ({error}): rerun its tta-predict command to rewrite it",
            file=sys.stderr,
        )
        return None
    return run


def load_runs(directory: Path) -> list[dict[str, Any]]:
    """Every run's metrics under ``directory``, each with its ``path`` (the run directory);
    unreadable ``metrics.json`` files are skipped with a warning."""
    runs = [run | {"path": p.parent} for p in sorted(directory.rglob("metrics.json")) if (run := read_metrics(p))]
    if not runs:
        unfinished = unfinished_runs(directory)
        hint = f" ({len(unfinished)} unfinished: rerun their command to finish them)" if unfinished else ""
        raise FileNotFoundError(
            f"no readable metrics.json under {directory}{hint}: point tta-report at a run or multirun directory"
        )
    return label_streams(runs)


def stream(run: dict[str, Any]) -> Any:
    return run.get("run", {}).get("config", {}).get("data", {}).get("stream")


def label_streams(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs over more than one stream order (``data.stream``: iid, sorted, dirichlet) name it in
    their ``data`` ("world (sorted stream)"), so that each stream gets its own rows instead of
    being averaged with the others as if it were a seed."""
    if len({stream(run) for run in runs}) < 2:
        return runs
    return [run | {"data": f"{run['data']} ({stream(run)} stream)"} if stream(run) else run for run in runs]


def unfinished_runs(directory: Path) -> dict[Path, int | None]:
    """Run directories under ``directory`` that hold a ``progress.json`` but no ``metrics.json``
    (stopped, failed or still running), with the batches written so far (``None``: unreadable)."""
    found: dict[Path, int | None] = {}
    for progress in sorted(directory.rglob("progress.json")):
        run = progress.parent.parent.parent if progress.parent.parent.name == "parts" else progress.parent
        if (run / "metrics.json").exists():
            continue
        try:
            batches = len(json.loads(progress.read_text())["batches"])
        except (OSError, ValueError, KeyError, TypeError):
            batches = None
        before = found.get(run, 0)  # a DDP run: its processes' parts add up
        found[run] = None if before is None or batches is None else before + batches
    return found


def unfinished_section(directory: Path) -> str:
    """Markdown list of the unfinished runs under ``directory`` ("" when there is none)."""
    unfinished = unfinished_runs(directory)
    if not unfinished:
        return ""
    lines = ["", f"Unfinished runs ({len(unfinished)}, not in the table; rerun their command to finish them):", ""]
    for run, batches in unfinished.items():
        written = "progress.json unreadable" if batches is None else f"{batches} batches written"
        lines.append(f"- {run.relative_to(directory).as_posix() if run != directory else '.'}: {written}")
    return "\n".join(lines)


def headline(run: dict[str, Any]) -> str:
    return run.get("headline", "accuracy")


def severity(run: dict[str, Any]) -> Any:
    return run.get("run", {}).get("config", {}).get("data", {}).get("severity")


def _cell(values: list[float], scale: float = 100.0, digits: int = 1) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def group_runs(runs: list[dict[str, Any]]) -> dict[Group, list[dict[str, Any]]]:
    groups: dict[Group, list[dict[str, Any]]] = defaultdict(list)
    methods = list(dict.fromkeys(run["method"] for run in runs))  # rows by severity, then methods as first seen
    for run in sorted(runs, key=lambda r: (severity(r) is None, severity(r) or 0, methods.index(r["method"]))):
        groups[(run["method"], run["model"], run["data"], severity(run))].append(run)
    return dict(groups)


def shifted_mean(run: dict[str, Any]) -> float | None:
    values = [d.get(headline(run)) for name, d in run["domains"].items() if name != CLEAN]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _domains(runs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run["domains"]))


def _domain_values(members: list[dict[str, Any]], name: str) -> list[float] | None:
    values = [r["domains"][name].get(headline(r)) for r in members if name in r["domains"]]
    return values if values and None not in values else None


def markdown_table(runs: list[dict[str, Any]]) -> str:
    """One row per (method, model, data, severity); scores in percent, mean ± std over seeds."""
    groups = group_runs(runs)
    domains = _domains(runs)
    with_severity = any(key[3] is not None for key in groups)
    score = headline(runs[0])
    header = [
        "method",
        "model",
        "data",
        *(["severity"] if with_severity else []),
        "seeds",
        *domains,
        f"shifted mean ({score})",
        "ECE",
        "ms/sample",
        "peak MB",
    ]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for (method, model, data, level), members in groups.items():
        cells = [
            method,
            model,
            data,
            *([str(level) if level is not None else "-"] if with_severity else []),
            str(len(members)),
        ]
        for name in domains:
            values = _domain_values(members, name)
            cells.append(_cell(values) if values else "-")
        shifted = [v for v in map(shifted_mean, members) if v is not None]
        cells.append(_cell(shifted) if shifted else "-")
        eces = [r.get("ece") for r in members]
        cells.append(_cell(eces, scale=1.0, digits=3) if None not in eces else "-")
        cells.append(_cell([r["ms_per_sample"] for r in members], scale=1.0, digits=2))
        cells.append(f"{max(r['peak_mem_mb'] for r in members):.0f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def accuracy_plot(runs: list[dict[str, Any]], path: Path) -> None:
    """Grouped bars: the score per domain, one bar per group, mean over seeds."""
    groups = group_runs(runs)
    domains = _domains(runs)
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(domains) + 2) + 3, 4))
    for k, ((method, model, data, level), members) in enumerate(groups.items()):
        means = [100 * statistics.fmean(v) if (v := _domain_values(members, name)) else 0.0 for name in domains]
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(domains))]
        label = f"{method} ({model}, {data}{'' if level is None else f', severity {level}'})"
        ax.bar(xs, means, width=width, label=label)
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_ylabel(f"{headline(runs[0])} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def severity_plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """Mean shifted score against severity, one line per (method, model, data), ± std over
    seeds as error bars. Returns False (and writes nothing) below two severities."""
    levels = sorted({severity(r) for r in runs if severity(r) is not None})
    if len(levels) < 2:
        return False
    lines: dict[tuple[str, str, str], dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for run in runs:
        value = shifted_mean(run)
        if severity(run) is not None and value is not None:
            lines[(run["method"], run["model"], run["data"])][severity(run)].append(100 * value)
    fig, ax = plt.subplots(figsize=(7, 4))
    markers, styles = "osD^vP*X", ("-", "--", ":", "-.")
    for k, ((method, model, data), by_level) in enumerate(lines.items()):
        xs = sorted(by_level)
        means = [statistics.fmean(by_level[x]) for x in xs]
        errors = [statistics.stdev(by_level[x]) if len(by_level[x]) > 1 else 0.0 for x in xs]
        # methods often coincide (an adaptation that changes little): dodge them sideways and
        # vary marker and line so that none hides another
        dodge = (k - (len(lines) - 1) / 2) * 0.06
        ax.errorbar(
            [x + dodge for x in xs],
            means,
            yerr=errors,
            marker=markers[k % len(markers)],
            linestyle=styles[k % len(styles)],
            capsize=3,
            label=f"{method} ({model}, {data})",
        )
    ax.set_xticks(levels)
    ax.set_xlabel("severity")
    ax.set_ylabel(f"mean {headline(runs[0])} over shifted domains (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _confidences(run: dict[str, Any]) -> tuple[list[float], list[bool]] | None:
    path = run["path"] / "predictions.csv"
    if not path.is_file():
        return None
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"confidence", "pred", "label"} <= set(rows[0]):
        return None
    rows = [r for r in rows if int(r["label"]) >= 0]
    return [float(r["confidence"]) for r in rows], [r["pred"] == r["label"] for r in rows]


def reliability_plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """One reliability diagram per method: accuracy per confidence bin (15 equal-width bins, as
    ECE), the gap to the diagonal shaded, the pooled ECE in the title. Returns False (and writes
    nothing) when no run has classifier rows."""
    pooled: dict[str, tuple[list[float], list[bool]]] = {}
    for run in runs:
        found = _confidences(run)
        if found:
            confidence, correct = pooled.setdefault(run["method"], ([], []))
            confidence += found[0]
            correct += found[1]
    if not pooled:
        return False
    fig, axes = plt.subplots(1, len(pooled), figsize=(3.2 * len(pooled), 3.4), squeeze=False)
    for ax, (method, (confidence, correct)) in zip(axes[0], pooled.items()):
        bins = reliability(confidence, correct)
        centres, accuracy, mean_conf, ece = bins.centres, bins.accuracy, bins.confidence, bins.ece
        width = centres[1] - centres[0]
        used = bins.count > 0
        ax.bar(centres[used], accuracy[used], width=width, edgecolor="black", linewidth=0.5, label="accuracy")
        ax.bar(
            centres[used],
            (mean_conf - accuracy)[used],
            bottom=accuracy[used],
            width=width,
            color="red",
            alpha=0.3,
            label="gap",
        )
        ax.plot([0, 1], [0, 1], "k--", linewidth=1)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1)
        ax.set_xlabel("confidence")
        ax.set_title(f"{method}\nECE {ece:.3f}, {len(confidence)} samples", fontsize=9)
    axes[0][0].set_ylabel("accuracy")
    axes[0][0].legend(fontsize=7, loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def published_rows(directory: Path) -> list[list[str]]:
    """``[card method, model, data, seed, run %, published %, difference]`` for every run under
    ``directory`` whose Hydra config carries a ``published`` block."""
    from omegaconf import OmegaConf

    rows = []
    for path in sorted(directory.rglob("metrics.json")):
        config = path.parent / ".hydra" / "config.yaml"
        published = OmegaConf.load(config).get("published") if config.is_file() else None
        run = read_metrics(path) if published is not None else None
        if run is None:
            continue
        reference = published.accuracy.get(run["data"])
        ours = None if run["accuracy"] is None else 100 * run["accuracy"]
        cells = [
            f"{reference:.2f}" if reference is not None else "not published",
            f"{ours - reference:+.2f}" if reference is not None and ours is not None else "-",
        ]
        rows.append(
            [run["method"], run["model"], run["data"], str(run["seed"]), "-" if ours is None else f"{ours:.2f}", *cells]
        )
    if not rows:
        raise FileNotFoundError(
            f"no run under {directory} has a published block: run an experiment= protocol "
            "card (configs/experiment) and point tta-report at its run directory"
        )
    return rows


def published_table(directory: str | Path) -> str:
    """Markdown: each run beside its protocol card's published accuracy (%) and the difference."""
    header = ["method", "model", "data", "seed", "run", "published", "difference"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in published_rows(Path(directory))]
    return "\n".join(lines)


def report(directory: str | Path) -> tuple[str, list[str]]:
    """Write the report files into ``directory``; returns the table and the files written."""
    directory = Path(directory)
    runs = load_runs(directory)
    table = markdown_table(runs) + unfinished_section(directory)
    (directory / "report.md").write_text(table + "\n")
    accuracy_plot(runs, directory / "report.png")
    written = ["report.md", "report.png"]
    if severity_plot(runs, directory / "accuracy_vs_severity.png"):
        written.append("accuracy_vs_severity.png")
    if reliability_plot(runs, directory / "reliability.png"):
        written.append("reliability.png")
    return table, written


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="tta-report", description=__doc__.split("\n\n")[0])
    parser.add_argument("directory", type=Path, help="a run directory or a multirun directory")
    parser.add_argument(
        "--compare-published",
        action="store_true",
        help="also compare each run with its protocol card's published numbers (published.md)",
    )
    args = parser.parse_args(argv)
    try:
        table, written = report(args.directory)
        print(table)
        if args.compare_published:
            table = published_table(args.directory)
            (args.directory / "published.md").write_text(table + "\n")
            print("\n" + table)
    except FileNotFoundError as error:
        print(f"tta-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    written += ["published.md"] if args.compare_published else []
    print(f"\nwrote {', '.join(str(args.directory / name) for name in written)}")


if __name__ == "__main__":
    main()
