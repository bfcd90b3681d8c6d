"""The online methods on the offline world: every shift x every stream order, seeds, and their cost.

    python benchmarks/online_world.py [--methods none,tda,dmn,boostadapter,dota,dpe] [--streams iid,sorted,dirichlet]
        [--seeds 0,1,2] [--n 200] [--out multirun/online_world] [--store DIR] [--table FILE]
    python benchmarks/online_world.py --cost [--n 50]   # the methods' own time against the views' encoding
    python benchmarks/online_world.py --tabulate [--out ...]   # the tables again, from a finished sweep

Effect: one ``tta-predict -m tta=<methods> data.stream=<streams> seed=<seeds> data.n_per_domain=<n>``
sweep (the command a user types; the view store at ``--store`` so that a seed's views are encoded
once for every method and stream that uses them), then one table per stream: per method the
accuracy on the clean domain and on each shift, the mean over the shifts, ECE, ms/sample and peak
memory (mean ± std over the seeds), and the state's size over the stream (mean and at the end,
from each run's log line).

Cost (``--cost``): the same methods, one seed, the i.i.d. stream, the store off, so that every run
encodes its views: per method its own work (the steps through its state) in ms per sample beside
the views' encoding in the same run, and their ratio (the goal: under 20%). A method that reads
the original view alone (``n_views=1``) takes its features from the model's forward; its
encoding time is then the run's ms/sample less the adaptation's (the forward, with the world's
rendering of the batch).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from pathlib import Path

SHIFTS = ("noise", "blur", "contrast", "sketch", "texture", "hue")
LOG_LINE = re.compile(
    r"(\w+): (\d+) samples; its own work ([\d.]+) ms a sample, the views' encoding ([\d.]+) ms; "
    r"state size: mean ([\d.]+) over the stream, (\d+) at the end"
)


def sweep(args: argparse.Namespace, out: Path, extra: list[str]) -> None:
    command = [
        str(Path(sys.executable).parent / "tta-predict"),
        "-m",
        f"tta={args.methods}",
        f"data.n_per_domain={args.n}",
        "trainer.enable_progress_bar=false",
        "print_table=false",
        f"hydra.sweep.dir={out}",
        *extra,
    ]
    print("$", " ".join(command), flush=True)
    subprocess.run(command, check=True, env={**os.environ, "OMP_NUM_THREADS": str(args.threads)})


def jobs(folder: Path) -> list[dict]:
    """Each finished job's metrics, its stream, and its callback's log line (None for zero-shot)."""
    found = []
    for metrics_file in sorted(folder.glob("*/metrics.json"), key=lambda p: int(p.parent.name)):
        metrics = json.loads(metrics_file.read_text())
        log = (metrics_file.parent / "cli.log").read_text()
        line = LOG_LINE.search(log)
        metrics["stream"] = metrics["run"]["config"]["data"]["stream"]
        metrics["online"] = None
        if line:
            metrics["online"] = {
                "method_ms": float(line[3]),
                "encode_ms": float(line[4]),
                "mean_size": float(line[5]),
                "end_size": int(line[6]),
            }
        found.append(metrics)
    return found


def mean_std(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    spread = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {spread:.{digits}f}"


def effect_tables(runs: list[dict]) -> str:
    lines = []
    for stream in dict.fromkeys(r["stream"] for r in runs):
        lines += [
            f"\n**data.stream={stream}**\n",
            "| method | seeds | clean | "
            + " | ".join(SHIFTS)
            + " | shifted mean | ECE | ms/sample | peak MB | state size (mean / end) |",
            "|---|---|" + "---|" * (len(SHIFTS) + 6),
        ]
        for method in dict.fromkeys(r["method"] for r in runs):
            group = [r for r in runs if r["stream"] == stream and r["method"] == method]
            cells = [mean_std([r["domains"]["clean"]["accuracy"] for r in group], scale=100)]
            cells += [mean_std([r["domains"][s]["accuracy"] for r in group], scale=100) for s in SHIFTS]
            shifted = [statistics.mean(r["domains"][s]["accuracy"] for s in SHIFTS) for r in group]
            cells.append(mean_std(shifted, scale=100))
            cells.append(mean_std([r["ece"] for r in group], digits=3))
            cells.append(mean_std([r["ms_per_sample"] for r in group], digits=2))
            cells.append(f"{max(r['peak_mem_mb'] for r in group):.0f}")
            online = [r["online"] for r in group if r["online"]]
            size = "-"
            if online:
                mean_size = statistics.mean(o["mean_size"] for o in online)
                size = f"{mean_size:.1f} / {statistics.mean(o['end_size'] for o in online):.0f}"
            cells.append(size)
            lines.append(f"| {method} | {len(group)} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def cost_table(runs: list[dict]) -> str:
    lines = [
        "| method | views | own work (ms/sample) | views' encoding (ms/sample) | own / encoding "
        "| ms/sample (whole run) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        if not r["online"]:
            continue
        config = next(iter(r["run"]["config"]["tta"]["callbacks"].values()))
        views = f"{config['n_views']} {config['views']}" if config["n_views"] > 1 else "original"
        encode = r["online"]["encode_ms"] if config["n_views"] > 1 else r["ms_per_sample"] - r["adapt_ms_per_sample"]
        own = r["online"]["method_ms"]
        share = f"{100 * own / encode:.1f}%"
        lines.append(f"| {r['method']} | {views} | {own:.3f} | {encode:.2f} | {share} | {r['ms_per_sample']:.2f} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--methods", default="none,tda,dmn,boostadapter,dota,dpe")
    parser.add_argument("--streams", default="iid,sorted,dirichlet")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--n", type=int, default=None, help="scenes per domain (default 200; --cost: 50)")
    parser.add_argument("--out", type=Path, default=Path("multirun/online_world"))
    parser.add_argument("--store", default=None, help="view store folder (default: tta-predict's)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cost", action="store_true", help="time the methods against their views' encoding")
    parser.add_argument("--tabulate", action="store_true", help="only print the tables of a finished sweep")
    parser.add_argument("--table", type=Path, default=None, help="also write the tables here (markdown)")
    args = parser.parse_args()
    args.n = args.n or (50 if args.cost else 200)
    if not args.tabulate:
        if args.cost:
            sweep(args, args.out, ["view_store=null", "seed=0", "data.stream=iid"])
        else:
            extra = [f"data.stream={args.streams}", f"seed={args.seeds}"]
            sweep(args, args.out, [*extra, *([f"view_store={args.store}"] if args.store else [])])
    runs = jobs(args.out)
    table = cost_table(runs) if args.cost else effect_tables(runs)
    print(table)
    if args.table:
        args.table.write_text(table)


if __name__ == "__main__":
    main()
