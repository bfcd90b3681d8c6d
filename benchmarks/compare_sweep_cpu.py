"""The README's compare sweep with and without the view-feature store, in one benchmark run.

    python benchmarks/compare_sweep_cpu.py [--n 200] [--seeds 0,1,2] [--out multirun/compare_sweep]

Runs ``tta-predict -m tta=<methods> seed=<seeds> data.n_per_domain=<n>`` twice, the commands a user
types: once with ``view_store=null`` (every run makes and encodes its views) and once with a fresh,
empty store (the first run of each view recipe and seed encodes, the later ones read). With
``--parallel`` the two sweeps run at the same time, one core each (``OMP_NUM_THREADS=1``); by
default one after the other. Prints (and writes to ``--table``) a markdown table: each sweep's
wall time and their ratio; per method, the mean ms/sample of its three seeds in each sweep;
whether every run's predictions.csv is byte-identical between the sweeps; and each method's
accuracy and ECE over the seeds (mean ± std; the effects, the same in both sweeps).
``--store-only`` runs the sweep with the store alone and tabulates each method's ms/sample against
zero-shot's (the runs after a recipe's first read their views).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

METHODS = "none,views,tpt,sts,zero,mta,ctpt"


def sweep(out: Path, methods: str, seeds: str, n: int, store: str, extra: list[str]) -> subprocess.Popen:
    command = [
        str(Path(sys.executable).parent / "tta-predict"),
        "-m",
        f"tta={methods}",
        f"seed={seeds}",
        f"data.n_per_domain={n}",
        f"view_store={store}",
        "print_table=false",
        "trainer.enable_progress_bar=false",
        f"hydra.sweep.dir={out}",
        *extra,
    ]
    env = os.environ | {"OMP_NUM_THREADS": "1"}
    log = (out.parent / f"{out.name}.log").open("w")
    return subprocess.Popen(command, env=env, stdout=log, stderr=subprocess.STDOUT)


def runs(folder: Path) -> dict[tuple[str, int], dict]:
    found = {}
    for metrics in sorted(folder.glob("*/metrics.json")):
        data = json.loads(metrics.read_text())
        data["folder"] = metrics.parent
        found[(data["method"], int(data["seed"]))] = data
    return found


def run_sweeps(args: argparse.Namespace, arms: dict[str, tuple[Path, str]]) -> dict[str, float]:
    """Each sweep's wall time in seconds: both at once (``--parallel``) or one after the other."""
    wall: dict[str, float] = {}
    if args.parallel:
        start = time.perf_counter()
        running = {arm: sweep(out, args.methods, args.seeds, args.n, s, args.extra) for arm, (out, s) in arms.items()}
        while running:
            for arm, process in list(running.items()):
                if process.poll() is not None:
                    wall[arm] = time.perf_counter() - start
                    del running[arm]
                    if process.returncode != 0:
                        raise SystemExit(f"the sweep {arm} failed: see {arms[arm][0]}.log")
            time.sleep(1)
        return wall
    for arm, (out, s) in arms.items():
        start = time.perf_counter()
        if sweep(out, args.methods, args.seeds, args.n, s, args.extra).wait() != 0:
            raise SystemExit(f"the sweep {arm} failed: see {out}.log")
        wall[arm] = time.perf_counter() - start
    return wall


def sweep_wall(folder: Path) -> float:
    """A finished sweep's wall time from its files: Hydra's multirun.yaml to the last metrics.json."""
    return max(f.stat().st_mtime for f in folder.glob("*/metrics.json")) - (folder / "multirun.yaml").stat().st_mtime


def mean_std(values: list[float], digits: int = 1, scale: float = 1.0) -> str:
    values = [v * scale for v in values]
    std = statistics.pstdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.{digits}f} ± {std:.{digits}f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--n", type=int, default=200, help="scenes per world domain")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--methods", default=METHODS)
    parser.add_argument("--out", type=Path, default=Path("multirun/compare_sweep"))
    parser.add_argument("--parallel", action="store_true", help="run the two sweeps at once, one core each")
    parser.add_argument("--table", type=Path, default=None, help="also write the table here")
    parser.add_argument(
        "--tabulate", action="store_true", help="only tabulate the sweeps already in --out (wall times from files)"
    )
    parser.add_argument(
        "--store-only", action="store_true", help="only the sweep with the store: per-sample times of reading runs"
    )
    parser.add_argument("extra", nargs="*", help="more overrides for both sweeps")
    args = parser.parse_args()

    arms = {"without store": (args.out / "without_store", "null"), "with store": (args.out / "with_store", "")}
    if args.store_only:
        del arms["without store"]
    if args.tabulate:  # an earlier benchmark's folders: wall times from their files
        store = next(args.out.glob("view-store-*"))
        wall = {arm: sweep_wall(out) for arm, (out, _) in arms.items()}
    else:
        shutil.rmtree(args.out, ignore_errors=True)
        args.out.mkdir(parents=True)
        store = Path(tempfile.mkdtemp(prefix="view-store-", dir=args.out))
        arms["with store"] = (arms["with store"][0], str(store))
        wall = run_sweeps(args, arms)
    with_store = runs(arms["with store"][0])
    if args.store_only:
        table = store_table(args, with_store)
        print(table)
        if args.table is not None:
            args.table.write_text(table + "\n")
        return
    without = runs(arms["without store"][0])
    if set(without) != set(with_store):
        raise SystemExit(f"the sweeps ran different jobs: {sorted(set(without) ^ set(with_store))}")
    identical = {
        key: (without[key]["folder"] / "predictions.csv").read_bytes()
        == (with_store[key]["folder"] / "predictions.csv").read_bytes()
        for key in without
    }
    store_mb = sum(f.stat().st_size for f in store.rglob("*") if f.is_file()) / 2**20
    zero_shot = [with_store[k]["ms_per_sample"] for k in with_store if k[0] == "none"]
    lines = [
        f"Compare sweep `tta={args.methods}`, seeds {args.seeds}, {args.n} scenes per domain "
        f"({next(iter(without.values()))['n']} a run), tta-world-resnet, CPU, one thread per sweep"
        f"{', the two sweeps at once' if args.parallel else ', one sweep after the other'}.",
        "",
        "| sweep | wall s | runs |",
        "|---|---|---|",
        *(f"| {arm} | {wall[arm]:.0f} | {len(without)} |" for arm in arms),
        f"| **ratio** | **{wall['without store'] / wall['with store']:.2f}x** | |",
        "",
        f"Predictions byte-identical between the sweeps: {sum(identical.values())} of {len(identical)} runs"
        + ("" if all(identical.values()) else f" (differ: {sorted(k for k, v in identical.items() if not v)})")
        + f". Store size after the sweep: {store_mb:.1f} MiB.",
        "",
        "| method | accuracy % | ECE | ms/sample without store | ms/sample with store | with store / zero-shot |",
        "|---|---|---|---|---|---|",
    ]
    for method in args.methods.split(","):
        keys = sorted(k for k in without if k[0] == method)
        if not keys:
            continue
        ms_with = [with_store[k]["ms_per_sample"] for k in keys]
        ratio = statistics.mean(ms_with) / statistics.mean(zero_shot) if zero_shot else float("nan")
        lines.append(
            f"| {method} | {mean_std([without[k]['accuracy'] for k in keys], 1, 100)} "
            f"| {mean_std([without[k]['ece'] for k in keys], 3)} "
            f"| {mean_std([without[k]['ms_per_sample'] for k in keys], 2)} | {mean_std(ms_with, 2)} | {ratio:.2f}x |"
        )
    lines += [
        "",
        "ms/sample: each run's metrics.json (predict wall time over samples, adaptation included); with the store,",
        "the first run of a view recipe and seed encodes the views (views for crop-and-flip, ctpt for AugMix), the",
        "later ones read them, so a method's with-store mean mixes one encoding run with reading runs only where",
        "it ran first.",
    ]
    table = "\n".join(lines)
    print(table)
    if args.table is not None:
        args.table.write_text(table + "\n")


def store_table(args: argparse.Namespace, with_store: dict[tuple[str, int], dict]) -> str:
    """Per-sample times of the sweep with the store: the first view method of a recipe encodes, the others read."""
    zero_shot = statistics.mean(v["ms_per_sample"] for k, v in with_store.items() if k[0] == "none")
    lines = [
        f"Sweep `tta={args.methods}` with the view store, seeds {args.seeds}, {args.n} scenes per domain, one thread.",
        "",
        "| method | ms/sample | adapt ms/sample | / zero-shot ms/sample |",
        "|---|---|---|---|",
    ]
    for method in args.methods.split(","):
        keys = sorted(k for k in with_store if k[0] == method)
        ms = statistics.mean(with_store[k]["ms_per_sample"] for k in keys)
        adapt = statistics.mean(with_store[k].get("adapt_ms_per_sample") or 0.0 for k in keys)
        lines.append(f"| {method} | {ms:.2f} | {adapt:.2f} | {ms / zero_shot:.2f}x |")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
