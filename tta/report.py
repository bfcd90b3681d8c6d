"""``tta-report DIR``: markdown tables and PNG plots from one run or a multirun directory.

Reads the ``metrics.json`` files under ``DIR`` (and, for reliability diagrams, the
``predictions.csv`` beside them) and groups the runs by their whole configuration, the run seed
left out: the run key (``key`` in ``metrics.json``: the resolved config of ``tta-predict``, or
the settings of a ``PredictionWriter`` run from Python, with the fingerprints of the data and
the weights under ``inputs``) without its ``seed`` and ``seed_in_force``; for older runs, the
resolved config (``run.config``) without ``seed`` and the display options; for runs that record
neither, method, model, data and severity. The runs of one group are seeds of one setting: each
cell is the mean over them, with the standard deviation when there are several. Runs with
another learning rate, stream order (``data.stream``), ``data.seed`` (other scenes) or anything
else are other rows. Writes into ``DIR``:

- ``report.md``: one row per group, ordered by severity, then method as first seen: method,
  model, data, severity, the settings that tell the row apart where these columns do not
  (``settings``, e.g. ``tta.callbacks.tpt.lr=0.001``; ``<unset>`` where the row's config lacks
  the name; fingerprints cut to 8 hex characters), the number of seeds, one column per domain,
  then the mean over the shifted domains, ECE, ms per sample and peak memory. Under the table,
  every dotted name whose value differs between rows ("Rows differ in: ..."; a name that some
  rows lack is named once, e.g. ``tta.callbacks.tpt``);
- ``report.png``: the per-domain scores as grouped bars;
- ``accuracy_vs_severity.png``: mean shifted score against ``data.severity``, one line per
  method and setting (when the runs cover two severities or more);
- ``reliability.png``: a reliability diagram per method, its runs' rows pooled (classifiers).

The score is the task's headline metric (``headline`` in ``metrics.json``; ``accuracy`` for
classifiers).

It prints a compact table in 80 columns, the rows of ``report.md`` in the same order: row
number; the method with, a line each under it, what else tells the row apart (model, data and
severity where they differ between rows, the distinguishing settings by short names such as
``tpt.lr=0.001``); seeds; clean and mean shifted score; ECE and ms per sample (means). Then the
"Rows differ in" line, the unfinished runs and where the full table is, every line folded to 80
characters. Every file is written before anything is printed: when the reader stops early
(``tta-report DIR | head``), it ends quietly with exit code 0.

A ``metrics.json`` that cannot be read (damaged, or not written by ``tta-predict``) is skipped
with a warning naming it, and so is a damaged ``predictions.csv`` (its rows are left out of
the reliability diagram). Runs that have started but not finished (a ``progress.json`` without
``metrics.json``) are listed under the table, with the batches they have written.

``--compare-published`` also puts each run beside the published numbers of the protocol card
it ran (the ``published`` block of its ``experiment`` config, read from the run's
``.hydra/config.yaml``): run accuracy, published accuracy and the difference, in points.
"""

from __future__ import annotations

import argparse
import copy
import csv
import io
import json
import os
import re
import statistics
import sys
import textwrap
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt

from tta.metrics.calibration import reliability
from tta.run_folder import drop_display_options, finished_batches

if TYPE_CHECKING:
    from rich.table import Table

CLEAN = "clean"
#: Columns of the printed output (as tta-predict's tables).
TABLE_WIDTH = 80
UNSET = "<unset>"
#: A setting's dotted name, as its keys ("tta", "callbacks", "tpt", "lr").
Name = tuple[str, ...]
#: The run seed in a run key; ``data.seed`` is no replicate (it draws other scenes) and stays.
SEED_KEYS = ("seed", "seed_in_force")
#: A fingerprint (``sha256:<hex>``), shown by its first 8 hex characters.
DIGEST = re.compile(r"(?:\w+:)?([0-9a-f]{16,})")
#: The longest setting value shown in a cell.
VALUE_CHARS = 40
#: Where a plot's legend entry is folded.
LEGEND_CHARS = 60


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


def _get(value: Any, *keys: str) -> Any:
    """``value[k1][k2]...``, or ``None`` where a level is missing or no dict."""
    for key in keys:
        if not isinstance(value, dict):
            return None
        value = value.get(key)
    return value


def recorded_config(run: dict[str, Any]) -> dict[str, Any] | None:
    """What the run recorded of its configuration: its run key, else tta-predict's resolved config."""
    for recorded in (run.get("key"), _get(run, "run", "config")):
        if isinstance(recorded, dict):
            return recorded
    return None


def run_config(run: dict[str, Any]) -> dict[str, Any] | None:
    """The run's whole configuration without its seed (and the display options of older runs'
    ``run.config``): equal for the seeds of one setting. ``None``: the run records none."""
    recorded = recorded_config(run)
    if recorded is None:
        return None
    config = copy.deepcopy(recorded)
    for key in SEED_KEYS:
        config.pop(key, None)
    return drop_display_options(config)


def stream(run: dict[str, Any]) -> Any:
    return _get(recorded_config(run), "data", "stream")


def severity(run: dict[str, Any]) -> Any:
    return _get(recorded_config(run), "data", "severity")


def label_streams(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Runs over more than one stream order (``data.stream``: iid, sorted, dirichlet) name it in
    their ``data`` ("world (sorted stream)"), so that the data column tells their rows apart."""
    if len({stream(run) for run in runs}) < 2:
        return runs
    return [run | {"data": f"{run['data']} ({stream(run)} stream)"} if stream(run) else run for run in runs]


def unfinished_runs(directory: Path) -> dict[Path, int | None]:
    """Run directories under ``directory`` that hold a ``progress.json`` but no ``metrics.json``
    (stopped, failed or still running), with the batches written so far (``None``: unreadable)."""
    runs = dict.fromkeys(
        progress.parent.parent.parent if progress.parent.parent.name == "parts" else progress.parent
        for progress in sorted(directory.rglob("progress.json"))
    )
    return {run: finished_batches(run) for run in runs if not (run / "metrics.json").exists()}


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


# --- groups and what tells them apart ----------------------------------------------------------


@dataclass
class Group:
    """The runs of one configuration, the run seed aside: one row of the report."""

    method: str
    model: str
    data: str
    severity: Any  # None: the data has none
    config: dict[str, Any] | None  # None: runs that record no configuration, grouped by the columns
    runs: list[dict[str, Any]] = field(default_factory=list)


def _canonical(value: Any) -> str:
    """One text per value, so that values compare as the JSON they came from (1 is not 1.0)."""
    return json.dumps(value, sort_keys=True)


def group_runs(runs: list[dict[str, Any]]) -> list[Group]:
    """The runs grouped by :func:`run_config` (by method, model, data and severity where there is
    none); rows by severity, then method as first seen."""
    groups: dict[str, Group] = {}
    methods = list(dict.fromkeys(run["method"] for run in runs))
    for run in sorted(runs, key=lambda r: (severity(r) is None, severity(r) or 0, methods.index(r["method"]))):
        config = run_config(run)
        columns = [run["method"], run["model"], run["data"], severity(run)]
        identity = _canonical({"config": config} if config is not None else {"columns": columns})
        groups.setdefault(identity, Group(*columns, config)).runs.append(run)
    return list(groups.values())


_MISSING = object()  # a name that a config lacks


def _entries(value: Any) -> dict[str, Any] | None:
    """The entries of a config node: a dict's, or a list of dicts' by position (a run key's
    ``callbacks``); ``None`` for a value (a number, a string, a list of values)."""
    if isinstance(value, dict):
        return value
    if isinstance(value, list) and all(isinstance(item, dict) for item in value):
        return {str(k): item for k, item in enumerate(value)}
    return None


def differing_names(configs: list[Any], name: Name = ()) -> list[Name]:
    """The names under ``name`` whose values differ between ``configs``, in the configs' order: a
    name that some configs lack (named once; its entries are compared among those that hold it)
    or a value that differs."""
    present = [config for config in configs if config is not _MISSING]
    nodes = [entries for config in present if (entries := _entries(config)) is not None]
    values = {_canonical(config) for config in present if _entries(config) is None}
    lacking = len(present) < len(configs)
    found = [name] if name and (lacking or len(values) > 1 or (values and nodes)) else []
    for key in dict.fromkeys(key for entries in nodes for key in entries):
        found += differing_names([entries.get(key, _MISSING) for entries in nodes], (*name, key))
    return found


def lookup(config: dict[str, Any] | None, name: Name) -> Any:
    """The value of ``name`` in ``config``; ``_MISSING`` where it has none."""
    value: Any = config
    for key in name:
        entries = _entries(value)
        if entries is None or key not in entries:
            return _MISSING
        value = entries[key]
    return value


def shown_value(value: Any) -> str:
    """A setting's value in a cell: ``<unset>`` for a missing one, a fingerprint by its first 8 hex
    characters, strings bare, others as JSON; cut at :data:`VALUE_CHARS` characters."""
    if value is _MISSING:
        return UNSET
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True, ensure_ascii=False)
    if digest := DIGEST.fullmatch(text):
        return digest.group(1)[:8]
    return text if len(text) <= VALUE_CHARS else text[: VALUE_CHARS - 1] + "…"


@dataclass
class Comparison:
    """The report's rows and the settings that differ between them."""

    groups: list[Group]
    #: every name whose value differs between rows
    differing: list[Name]
    #: those that the method, model, data and severity columns do not show
    distinguishing: list[Name]

    def settings(self, group: Group, names: dict[Name, str] | None = None) -> list[str]:
        """``name=value`` of each distinguishing setting of ``group`` (``names``: how to write each
        name; dotted by default); none for runs that record no configuration."""
        if group.config is None:
            return []
        return [
            f"{names[name] if names else '.'.join(name)}={shown_value(lookup(group.config, name))}"
            for name in self.distinguishing
        ]


def distinguishing_names(groups: list[Group], names: list[Name]) -> list[Name]:
    """The ``names`` whose values the method, model, data and severity columns do not tell: what a
    row must add to be told apart. Fingerprints (``inputs``) come last, and only where the settings
    kept do not tell them either (the weights' fingerprint follows ``model.vlm.pretrained``)."""
    settings = [name for name in names if name[0] != "inputs"]
    kept = [name for name in settings if not _told(groups, name, [])]
    return kept + [name for name in names if name[0] == "inputs" and not _told(groups, name, kept)]


def _told(groups: list[Group], name: Name, by: list[Name]) -> bool:
    """Whether the columns and the names ``by`` tell the value of ``name`` in every group."""
    seen: dict[str, str] = {}
    for group in groups:
        context = _canonical(
            [group.method, group.model, group.data, group.severity, *(_setting_text(group, k) for k in by)]
        )
        if seen.setdefault(context, _setting_text(group, name)) != _setting_text(group, name):
            return False
    return True


def _setting_text(group: Group, name: Name) -> str:
    """The value of ``name`` to compare: for a node, only whether the group holds it (its entries
    are names of their own)."""
    value = lookup(group.config, name)
    if value is _MISSING:
        return UNSET
    return "<entries>" if _entries(value) is not None else _canonical(value)


def compare(runs: list[dict[str, Any]]) -> Comparison:
    """The runs' groups, and what differs between them (among the groups that record a config)."""
    groups = group_runs(runs)
    configured = [group for group in groups if group.config is not None]
    differing = differing_names([group.config for group in configured])
    return Comparison(groups, differing, distinguishing_names(configured, differing))


def short_names(names: list[Name]) -> dict[Name, str]:
    """Each name by its shortest ending of two keys or more that no other of ``names`` shares and
    that starts with no list position (``tpt.lr`` for ``tta.callbacks.tpt.lr``, ``callbacks.0.lr``)."""
    short = {}
    for name in names:
        size = min(2, len(name))
        while size < len(name) and (name[-size].isdigit() or sum(other[-size:] == name[-size:] for other in names) > 1):
            size += 1
        short[name] = ".".join(name[-size:])
    return short


# --- cells -------------------------------------------------------------------------------------


def _cell(values: list[float], scale: float = 100.0, digits: int = 1, spread: bool = True) -> str:
    mean = statistics.fmean(values) * scale
    if len(values) == 1 or not spread:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def shifted_mean(run: dict[str, Any]) -> float | None:
    values = [d.get(headline(run)) for name, d in run["domains"].items() if name != CLEAN]
    values = [v for v in values if v is not None]
    return statistics.fmean(values) if values else None


def _domains(runs: list[dict[str, Any]]) -> list[str]:
    return list(dict.fromkeys(name for run in runs for name in run["domains"]))


def _domain_values(members: list[dict[str, Any]], name: str) -> list[float] | None:
    values = [r["domains"][name].get(headline(r)) for r in members if name in r["domains"]]
    return values if values and None not in values else None


def _domain_cell(members: list[dict[str, Any]], name: str) -> str:
    values = _domain_values(members, name)
    return _cell(values) if values else "-"


def _shifted_cell(members: list[dict[str, Any]]) -> str:
    shifted = [v for v in map(shifted_mean, members) if v is not None]
    return _cell(shifted) if shifted else "-"


def _ece_cell(members: list[dict[str, Any]], spread: bool = True) -> str:
    eces = [r.get("ece") for r in members]
    return _cell(eces, scale=1.0, digits=3, spread=spread) if None not in eces else "-"


def _ms_cell(members: list[dict[str, Any]], spread: bool = True) -> str:
    return _cell([r["ms_per_sample"] for r in members], scale=1.0, digits=2, spread=spread)


# --- report.md and the printed table -----------------------------------------------------------


def _markdown(header: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def markdown_table(comparison: Comparison) -> str:
    """One row per group; scores in percent, mean ± std over seeds; then the names that differ."""
    groups = comparison.groups
    runs = [run for group in groups for run in group.runs]
    domains = _domains(runs)
    with_severity = any(group.severity is not None for group in groups)
    header = [
        "method",
        "model",
        "data",
        *(["severity"] if with_severity else []),
        *(["settings"] if comparison.distinguishing else []),
        "seeds",
        *domains,
        f"shifted mean ({headline(runs[0])})",
        "ECE",
        "ms/sample",
        "peak MB",
    ]
    rows = []
    for group in groups:
        settings = ", ".join(comparison.settings(group)).replace("|", "\\|") or "-"
        rows.append(
            [
                group.method,
                group.model,
                group.data,
                *([_label(group.severity)] if with_severity else []),
                *([settings] if comparison.distinguishing else []),
                str(len(group.runs)),
                *(_domain_cell(group.runs, name) for name in domains),
                _shifted_cell(group.runs),
                _ece_cell(group.runs),
                _ms_cell(group.runs),
                f"{max(r['peak_mem_mb'] for r in group.runs):.0f}",
            ]
        )
    table = _markdown(header, rows)
    return table + (f"\n\n{differ_line(comparison)}" if comparison.differing else "")


def differ_line(comparison: Comparison) -> str:
    return "Rows differ in: " + ", ".join(".".join(name) for name in comparison.differing)


def terminal_table(comparison: Comparison) -> Table:
    """The rows of report.md in 80 columns: number; method, and under it what else tells the row
    apart (the model, data and severity where they differ between rows, and the distinguishing
    settings by short names), a line each; seeds; clean and mean shifted score; ECE and ms per
    sample (means)."""
    from rich import box
    from rich.table import Table

    groups = comparison.groups
    runs = [run for group in groups for run in group.runs]
    labels = [
        column for column in ("model", "data", "severity") if len({_canonical(getattr(g, column)) for g in groups}) > 1
    ]
    names = short_names(comparison.distinguishing)
    with_clean = CLEAN in _domains(runs)
    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    table.add_column("#", justify="right")
    table.add_column("method, setting" if labels or names else "method", overflow="fold")
    for heading in ("seeds", *([CLEAN] if with_clean else []), "shifted", "ECE", "ms/sample"):
        table.add_column(heading, justify="right", no_wrap=True)
    for number, group in enumerate(groups, 1):
        setting = [f"{column}={_label(getattr(group, column))}" for column in labels]
        setting += comparison.settings(group, names)
        table.add_row(
            str(number),
            "\n  ".join([group.method, *setting]),
            str(len(group.runs)),
            *([_domain_cell(group.runs, CLEAN)] if with_clean else []),
            _shifted_cell(group.runs),
            _ece_cell(group.runs, spread=False),
            _ms_cell(group.runs, spread=False),
        )
    return table


def _label(value: Any) -> str:
    return "-" if value is None else str(value)


def fold(text: str) -> str:
    """``text`` with every line folded to 80 columns (at spaces where it can; a longer word, such
    as a long path, is cut)."""
    return "\n".join(textwrap.fill(line, TABLE_WIDTH, break_on_hyphens=False) for line in text.splitlines())


# --- plots -------------------------------------------------------------------------------------


def accuracy_plot(comparison: Comparison, path: Path) -> None:
    """Grouped bars: the score per domain, one bar per group, mean over seeds."""
    groups = comparison.groups
    runs = [run for group in groups for run in group.runs]
    domains = _domains(runs)
    width = 0.8 / max(1, len(groups))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(domains) + 2) + 3, 4))
    for k, group in enumerate(groups):
        means = [100 * statistics.fmean(v) if (v := _domain_values(group.runs, name)) else 0.0 for name in domains]
        xs = [i + (k - (len(groups) - 1) / 2) * width for i in range(len(domains))]
        details = [group.model, group.data, *([f"severity {group.severity}"] if group.severity is not None else [])]
        label = f"{group.method} ({', '.join(details + comparison.settings(group))})"
        ax.bar(xs, means, width=width, label=textwrap.fill(label, LEGEND_CHARS))
    ax.set_xticks(range(len(domains)), domains, rotation=30, ha="right")
    ax.set_ylabel(f"{headline(runs[0])} (%)")
    ax.set_ylim(0, 100)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))  # beside the bars, never over them
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend's width follows its labels
    plt.close(fig)


def severity_plot(comparison: Comparison, path: Path) -> bool:
    """Mean shifted score against severity, one line per method, model, data and distinguishing
    settings, ± std over seeds as error bars. Returns False (and writes nothing) below two
    severities."""
    groups = [group for group in comparison.groups if group.severity is not None]
    levels = sorted({group.severity for group in groups})
    if len(levels) < 2:
        return False
    lines: dict[str, dict[Any, list[float]]] = defaultdict(lambda: defaultdict(list))
    for group in groups:
        label = f"{group.method} ({', '.join([group.model, group.data, *comparison.settings(group)])})"
        values = [100 * value for value in map(shifted_mean, group.runs) if value is not None]
        lines[label][group.severity] += values
    fig, ax = plt.subplots(figsize=(7, 4))
    markers, styles = "osD^vP*X", ("-", "--", ":", "-.")
    for k, (label, by_level) in enumerate(lines.items()):
        xs = sorted(x for x, values in by_level.items() if values)
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
            label=textwrap.fill(label, LEGEND_CHARS),
        )
    ax.set_xticks(levels)
    ax.set_xlabel("severity")
    ax.set_ylabel(f"mean {headline(groups[0].runs[0])} over shifted domains (%)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0))
    fig.savefig(path, dpi=120, bbox_inches="tight")  # the legend's width follows its labels
    plt.close(fig)
    return True


#: The columns of a classifier's predictions.csv that the reliability diagram reads.
RELIABILITY_COLUMNS = ("label", "pred", "confidence")


def read_confidences(path: Path) -> tuple[list[float], list[bool]]:
    """Confidence and correctness of the labelled rows of a classifier's ``predictions.csv``.
    Raises ``ValueError`` (or ``csv.Error``, ``OSError``) saying what is wrong with a damaged one:
    a row whose fields do not match the header, a missing column, a label, prediction or
    confidence that is no number (a confidence outside [0, 1]), bytes that are no UTF-8."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            raise ValueError("empty file")
        missing = [column for column in RELIABILITY_COLUMNS if column not in header]
        if missing:
            raise ValueError(f"no column {', '.join(missing)}")
        at = [header.index(column) for column in RELIABILITY_COLUMNS]
        confidence, correct = [], []
        for row in reader:
            if len(row) != len(header):
                raise ValueError(f"line {reader.line_num}: {len(row)} fields, the header has {len(header)}")
            label, pred, conf = (row[k] for k in at)
            try:
                label_value, pred_value, conf_value = int(label), int(pred), float(conf)
            except ValueError:
                raise ValueError(
                    f"line {reader.line_num}: label {label!r}, pred {pred!r}, confidence {conf!r} are not all numbers"
                ) from None
            if not 0.0 <= conf_value <= 1.0:
                raise ValueError(f"line {reader.line_num}: confidence {conf!r} is not in [0, 1]")
            if label_value >= 0:
                confidence.append(conf_value)
                correct.append(pred_value == label_value)
    return confidence, correct


def reliability_plot(runs: list[dict[str, Any]], path: Path) -> bool:
    """One reliability diagram per method: accuracy per confidence bin (15 equal-width bins, as
    ECE), the gap to the diagonal shaded, the pooled ECE in the title. Reads the
    ``predictions.csv`` of classifier runs (those with an ``ece``); a damaged one is skipped with
    a warning naming it. Returns False (and writes nothing) when no run has classifier rows."""
    pooled: dict[str, tuple[list[float], list[bool]]] = {}
    for run in runs:
        predictions = run["path"] / "predictions.csv"
        if "ece" not in run or not predictions.is_file():
            continue
        try:
            found = read_confidences(predictions)
        except (OSError, ValueError, csv.Error) as error:
            print(
                f"tta-report: warning: skipping {predictions} ({error}): its rows are left out of the "
                "reliability diagram; rerun its tta-predict command to check the file",
                file=sys.stderr,
            )
            continue
        if found[0]:
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


# --- published numbers -------------------------------------------------------------------------

PUBLISHED_HEADER = ["method", "model", "data", "seed", "run", "published", "difference"]


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
    return _markdown(PUBLISHED_HEADER, published_rows(Path(directory)))


def published_terminal_table(rows: list[list[str]]) -> Table:
    """The rows of :func:`published_rows` in 80 columns."""
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False, padding=(0, 1), collapse_padding=True)
    for heading in PUBLISHED_HEADER:
        table.add_column(
            heading, overflow="fold", justify="left" if heading in ("method", "model", "data") else "right"
        )
    for row in rows:
        table.add_row(*row)
    return table


# --- the command -------------------------------------------------------------------------------


@dataclass
class Report:
    """What :func:`write_report` wrote: the rows, report.md's text and the files' names."""

    comparison: Comparison
    markdown: str
    unfinished: str
    written: list[str]


def write_report(directory: str | Path) -> Report:
    """Write the report files into ``directory``."""
    directory = Path(directory)
    runs = load_runs(directory)
    comparison = compare(runs)
    unfinished = unfinished_section(directory)
    markdown = markdown_table(comparison) + unfinished
    (directory / "report.md").write_text(markdown + "\n")
    accuracy_plot(comparison, directory / "report.png")
    written = ["report.md", "report.png"]
    if severity_plot(comparison, directory / "accuracy_vs_severity.png"):
        written.append("accuracy_vs_severity.png")
    if reliability_plot(runs, directory / "reliability.png"):
        written.append("reliability.png")
    return Report(comparison, markdown, unfinished, written)


def report(directory: str | Path) -> tuple[str, list[str]]:
    """Write the report files into ``directory``; returns report.md's text and the files written."""
    result = write_report(directory)
    return result.markdown, result.written


def printed_table(result: Report) -> str:
    """The compact table, the names that differ and the unfinished runs, as ``tta-report`` prints
    them: no line longer than 80 characters."""
    score = headline(result.comparison.groups[0].runs[0])
    # under the table rather than its caption, which would fold to the table's width
    text = plain_text(terminal_table(result.comparison))
    text += "\n" + fold(f"{score} in %: mean ± std over seeds; ECE and ms/sample: means over seeds")
    if result.comparison.differing:
        text += "\n" + fold(differ_line(result.comparison))
    return text + ("\n" + fold(result.unfinished) if result.unfinished else "")


def plain_text(table: Table) -> str:
    """``table`` at 80 columns as plain text: no colour codes (the same in a terminal, a pipe and a
    log), no padding after each line."""
    from rich.console import Console

    console = Console(width=TABLE_WIDTH, file=io.StringIO(), color_system=None, force_terminal=False, highlight=False)
    console.print(table)
    return "\n".join(line.rstrip() for line in console.file.getvalue().splitlines())


def print_or_stop_quietly(text: str) -> None:
    """Print ``text``; if the reader has gone (``tta-report DIR | head``), stop with exit code 0:
    the files are written, so nothing failed."""
    try:
        print(text, flush=True)
    except BrokenPipeError:
        # as Python's docs on SIGPIPE advise: stdout on devnull, so the flush at exit cannot fail again
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        sys.exit(0)


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
        result = write_report(args.directory)
        text = printed_table(result)
        if args.compare_published:
            rows = published_rows(args.directory)
            (args.directory / "published.md").write_text(_markdown(PUBLISHED_HEADER, rows) + "\n")
            result.written.append("published.md")
            text += "\n\n" + plain_text(published_terminal_table(rows))
    except FileNotFoundError as error:
        print(f"tta-report: error: {error}", file=sys.stderr)
        sys.exit(2)
    where = f"full table: {args.directory / 'report.md'}\nwrote {', '.join(result.written)} in {args.directory}"
    print_or_stop_quietly(text + "\n\n" + fold(where))


if __name__ == "__main__":
    main()
