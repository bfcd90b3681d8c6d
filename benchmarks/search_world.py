"""Search-TTA on the offline world: does adapting the map find more targets within the budget?

    python benchmarks/search_world.py [--episodes 50] [--out benchmarks/results/search_world.md]
    python benchmarks/search_world.py --episodes 40 --seed 1000 --lr 1e-5:1e-4 1e-4:1e-3 ...  # choose rates

Each episode (seeds 20000, 20001, ...: the world_search data config's; ``--seed`` starts elsewhere,
e.g. at 1000 where the world learning rates were chosen) is rendered once and searched by arms with
the same budget and start: the lawnmower sweep, the greedy planner on the unadapted (zero-shot)
map, and the greedy planner with Search-TTA at the world rates of the search_world experiment
(read from ``configs/tta/search_tta_world.yaml``, everything else the reference's), or one arm per
``--lr START:END`` pair, and, with ``--with-reference-lr``, at the reference rates
(``configs/tta/search_tta.yaml``). ``--with-centred`` adds the world option: the map centred
(``bias=centred``) with the learning rate ramping over the budget instead of the grid cells,
beside its own unadapted (centred) map. The arms run through the same code as ``tta-predict``
(``SearchEpisodeRunner.search`` and ``SearchTTA.session``), without Lightning's loop. Prints
and writes a markdown report: mean, std and per-episode wins/ties/losses of the fraction found
against the arm's unadapted map and the paired gain, steps to the first/middle/last target, the
cost per update, and, by how good the zero-shot map was (AUROC of the cell scores against "the
cell holds a target"), each arm's gain, updates and the AUROC of its zero-shot and last adapted
scores on the cells it left unvisited (did the updates help where the search goes next?). One
CPU thread.
"""

from __future__ import annotations

import argparse
import csv
import math
import os
import shlex
import statistics
import sys
import time
from importlib.resources import files
from pathlib import Path

import torch
from omegaconf import OmegaConf
from torchmetrics.functional.classification import binary_auroc

from tta.callbacks import SearchTTA
from tta.datamodules.search import WorldEpisodes, collate_episodes
from tta.methods.search import SearchTTASession, search_with_tta, zero_shot_scores
from tta.models import create_vlm
from tta.tasks import SearchEpisodeRunner
from tta.tasks.search_runner import episode_query
from tta.validation import OptionError, check_number
from tta.world.search import SearchWorld

UNADAPTED = "greedy, unadapted map"
UNADAPTED_CENTRED = "greedy, unadapted centred map"
#: arm -> (runner settings, SearchTTA settings or None, the unadapted arm it is paired with)
Arms = dict[str, tuple[dict, dict | None, str | None]]


def lr_text(value: float) -> str:
    """A learning rate as the configs and docs write it: 1e-4, 3e-5, 2.5e-3."""
    mantissa, exponent = f"{value:e}".split("e")
    return f"{mantissa.rstrip('0').rstrip('.')}e{int(exponent)}"


def config_settings(name: str) -> dict:
    """The SearchTTA settings of ``configs/tta/<name>.yaml`` (without its ``_target_``): the arms
    read the rates from the configs a user runs rather than repeating them."""
    config = OmegaConf.load(files("tta.configs").joinpath("tta", f"{name}.yaml"))
    settings = OmegaConf.to_container(config.callbacks.search_tta)
    settings.pop("_target_")
    return settings


def rate_pair(text: str) -> tuple[float, float]:
    """``--lr``'s START:END, both > 0."""
    try:
        start, end = (float(value) for value in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"takes START:END pairs such as 1e-4:1e-3, got {text!r}") from None
    try:
        check_number("START", start, 0, low_open=True)
        check_number("END", end, 0, low_open=True)
    except OptionError as error:
        raise argparse.ArgumentTypeError(f"{error} in {text!r}") from None
    return start, end


def build_arms(args: argparse.Namespace) -> Arms:
    """The lawnmower, the greedy planner on the unadapted map, and one Search-TTA arm per
    ``--lr`` pair (default: the world rates of ``configs/tta/search_tta_world.yaml``); every other
    SearchTTA setting is that config's. With ``--with-reference-lr`` the reference
    (``search_tta.yaml``); with ``--with-centred`` the centred map and its unadapted twin."""
    world = config_settings("search_tta_world")
    arms: Arms = {"lawnmower": ({"planner": "lawnmower"}, None, UNADAPTED), UNADAPTED: ({}, None, None)}
    for start, end in args.lr or [(world["lr_start"], world["lr_end"])]:
        name = f"greedy + Search-TTA, lr {lr_text(start)} -> {lr_text(end)}"
        arms[name] = ({}, {**world, "lr_start": start, "lr_end": end}, UNADAPTED)
    if args.with_reference_lr:
        reference = config_settings("search_tta")
        name = f"greedy + Search-TTA, reference lr {lr_text(reference['lr_start'])} -> {lr_text(reference['lr_end'])}"
        arms[name] = ({}, reference, UNADAPTED)
    if args.with_centred:
        arms[UNADAPTED_CENTRED] = ({"bias": "centred"}, None, None)
        name = (
            f"greedy + Search-TTA, centred map, lr {lr_text(world['lr_start'])} -> {lr_text(world['lr_end'])} "
            "over the budget"
        )
        arms[name] = ({"bias": "centred"}, {**world, "lr_ramp_steps": args.budget}, UNADAPTED_CENTRED)
    return arms


def fmt(value: float | None, spec: str = ".1f") -> str:
    return "-" if value is None else format(value, spec)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--episodes", type=int, default=50)
    parser.add_argument("--seed", type=int, default=20_000, help="first episode's seed (20000: the benchmark's)")
    parser.add_argument(
        "--lr",
        type=rate_pair,
        nargs="+",
        metavar="START:END",
        help="one Search-TTA arm per learning-rate pair, e.g. 1e-5:1e-4 1e-4:1e-3 (default: the world config's)",
    )
    parser.add_argument("--budget", type=int, default=64)
    parser.add_argument("--grid", type=int, default=16, help="cells per side (8 for tta-world-vit's token grid)")
    parser.add_argument("--domain", default="clean")
    parser.add_argument(
        "--with-reference-lr",
        action="store_true",
        help="add the arm at the reference learning rates (doubles the run time)",
    )
    parser.add_argument(
        "--with-centred",
        action="store_true",
        help="add the world option (centred map, lr ramp over the budget) and its unadapted map",
    )
    parser.add_argument(
        "--model", default="tta-world-resnet", help="the map's model (tta-world-vit: patch tokens, with --grid 8)"
    )
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "search_world.md")
    parser.add_argument(
        "--merge",
        type=Path,
        nargs="+",
        help="only print the paired differences over the episodes of these per-episode CSVs (runs split by --seed)",
    )
    args = parser.parse_args()
    if args.merge:
        print("\n".join(merged_pairs(args.merge)))
        return
    for option, value in (("--episodes", args.episodes), ("--budget", args.budget), ("--grid", args.grid)):
        try:
            check_number(option, value, 1, integer=True)
        except OptionError as error:
            parser.error(str(error))
    torch.set_num_threads(1)
    arms = build_arms(args)
    vlm = create_vlm(args.model)
    runners = {name: SearchEpisodeRunner(vlm, budget=args.budget, **runner) for name, (runner, _, _) in arms.items()}
    callbacks = {name: SearchTTA(seed=0, **tta) for name, (_, tta, _) in arms.items() if tta}
    world = SearchWorld(rows=args.grid, cols=args.grid)
    episodes = WorldEpisodes(
        [args.seed + k for k in range(args.episodes)], [args.domain] * args.episodes, 3, world, "text"
    )
    rows = []
    started = time.perf_counter()
    for k in range(args.episodes):
        batch = collate_episodes([episodes[k]])
        with torch.no_grad():
            scores = zero_shot_scores(vlm, batch["image"][0], (args.grid, args.grid), episode_query(batch, 0))
        counts = batch["counts"][0]
        row = {
            "episode": k,
            "n_targets": int(counts.sum()),
            "map_auroc": float(binary_auroc(scores, (counts.flatten() > 0).long())),
        }
        results = {}
        for name, runner in runners.items():
            if name not in callbacks:
                results[name] = runner.search(batch, 0)
                continue
            cpu_start = time.process_time()
            session = callbacks[name].session(runner, batch, 0)
            results[name] = search_with_tta(session, counts, args.budget, "greedy")
            row[f"auroc_unvisited[{name}]"] = unvisited_aurocs(session, counts)
            row[f"cpu_ms[{name}]"] = (time.process_time() - cpu_start) * 1000
        for name, result in results.items():
            row[name] = result
        rows.append(row)
        # written each episode: kept if the run is cut short
        write_episode_csv(rows, arms, args.out.with_name(args.out.stem + "_episodes.csv"))
        print(
            f"episode {k}: {row['n_targets']} targets, map AUROC {row['map_auroc']:.2f}, found "
            + ", ".join(f"{r.found}" for r in results.values()),
            flush=True,
        )
    total_s = time.perf_counter() - started
    report = make_report(rows, arms, args, total_s)
    print(report)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)


def unvisited_aurocs(session: SearchTTASession, counts: torch.Tensor) -> tuple[float, float]:
    """AUROC ("the cell holds a target") of the zero-shot and of the last adapted cell scores on
    the cells the adapted search left unvisited: did the updates improve the map where the search
    would go next? NaN where those cells hold no target, or nothing else."""
    unvisited = torch.ones(session.n_cells, dtype=torch.bool)
    unvisited[sorted(session.visited)] = False
    labels = (counts.flatten()[unvisited] > 0).long()
    if labels.min() == labels.max():
        return math.nan, math.nan
    before, after = (
        float(binary_auroc(s.detach().cpu()[unvisited], labels)) for s in (session.initial_scores, session.scores)
    )
    return before, after


def write_episode_csv(rows: list[dict], arms: Arms, path: Path) -> None:
    names = list(arms)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(
            ["episode", "n_targets", "map_auroc"]
            + [f"found[{n}]" for n in names]
            + [f"updates[{n}]" for n in names if arms[n][1]]
            + [f"auroc_unvisited_{when}[{n}]" for n in names if arms[n][1] for when in ("before", "after")]
        )
        for row in rows:
            writer.writerow(
                [row["episode"], row["n_targets"], f"{row['map_auroc']:.4f}"]
                + [row[n].found for n in names]
                + [row[n].n_updates for n in names if arms[n][1]]
                + [f"{value:.4f}" for n in names if arms[n][1] for value in row[f"auroc_unvisited[{n}]"]]
            )


def merged_pairs(paths: list[Path]) -> list[str]:
    """Paired differences of every adapted arm against its unadapted map over the episodes of
    several per-episode CSVs (one run split into seed ranges): the adapted arms are the columns
    with an update count, each paired with the unadapted map of its bias."""
    rows = [row for path in paths for row in csv.DictReader(path.read_text().splitlines())]
    lines = [f"{len(rows)} episodes from {', '.join(str(p) for p in paths)}"]
    for name in [key.removeprefix("updates[").removesuffix("]") for key in rows[0] if key.startswith("updates[")]:
        baseline = UNADAPTED_CENTRED if "centred map" in name else UNADAPTED
        kept = [r for r in rows if int(r["n_targets"])]
        diffs = [100 * (int(r[f"found[{name}]"]) - int(r[f"found[{baseline}]"])) / int(r["n_targets"]) for r in kept]
        wins, losses = sum(d > 0 for d in diffs), sum(d < 0 for d in diffs)
        fraction = statistics.fmean(int(r[f"found[{name}]"]) / int(r["n_targets"]) for r in kept)
        unadapted = statistics.fmean(int(r[f"found[{baseline}]"]) / int(r["n_targets"]) for r in kept)
        error = statistics.stdev(diffs) / len(diffs) ** 0.5
        lines.append(
            f"{name}: {100 * fraction:.1f}% found against {100 * unadapted:.1f}% on the "
            f"{baseline.removeprefix('greedy, ')}; paired {statistics.fmean(diffs):+.1f} points (standard error "
            f"{error:.1f}), W/T/L {wins}/{len(diffs) - wins - losses}/{losses}"
        )
    return lines


def paired_gain(rows: list[dict], name: str, baseline: str) -> tuple[float, float]:
    """Mean and standard error over episodes of the arm's fraction found minus its baseline's, in points."""
    diffs = [100 * (r[name].found_fraction - r[baseline].found_fraction) for r in rows if r["n_targets"]]
    error = statistics.stdev(diffs) / len(diffs) ** 0.5 if len(diffs) > 1 else float("nan")
    return statistics.fmean(diffs), error


def make_report(rows: list[dict], arms: Arms, args: argparse.Namespace, total_s: float) -> str:
    names = list(arms)
    lines = [
        f"# Search-TTA on the offline world ({len(rows)} episodes, domain {args.domain})",
        "",
        f"`python benchmarks/search_world.py {shlex.join(sys.argv[1:])}` "
        f"(seeds {args.seed}-{args.seed + len(rows) - 1}; "
        f"{args.grid} x {args.grid} cells of 64 px, budget {args.budget} moves from the top-left cell, {args.model}, "
        f"1 CPU thread; whole run {total_s / 60:.1f} min, load average at the end {os.getloadavg()[0]:.1f} on "
        f"{os.cpu_count()} cores).",
        "",
        "Fraction found: per episode, targets found within the budget / targets in the episode; mean +- std over "
        "episodes. ms / update: median wall time of one update (reset, forward and backward on the visited "
        f"cells, Adam step, re-encoding all {args.grid**2} cells); CPU ms / update: the process CPU time of the whole "
        "adapted episode (session set-up and planning included) per update, median over episodes: the cost on "
        "an unshared core (the wall time was measured on a 2-core machine shared with other jobs, load average "
        "in the header). Steps: mean over the episodes that reached that target (how many in brackets). "
        "Paired gain: the arm's fraction found minus its unadapted map's, mean over episodes in points "
        "(standard error). W/T/L: episodes where the arm found more / as many / fewer targets than its unadapted map "
        f"({UNADAPTED}, or the centred one for the centred arm). Map: sigmoid(cos / 0.07), no bias "
        "(the reference's), blurred 5 x 5 (sigma 1.1, reflected borders); centred: minus the episode's mean "
        "cosine inside the sigmoid.",
        "",
        "| arm | fraction found | std | targets found (pooled) | steps to first | to middle | to last "
        "| paired gain (SE) | W/T/L vs unadapted | updates / episode | ms / update (wall) | CPU ms / update |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    total_targets = sum(r["n_targets"] for r in rows)
    for name in names:
        results = [r[name] for r in rows]
        fractions = [r.found_fraction for r in results if r.found_fraction is not None]
        steps = {}
        for which in ("first", "middle", "last"):
            reached = [r.steps_to(which) for r in results if r.steps_to(which) is not None]
            steps[which] = f"{fmt(statistics.fmean(reached) if reached else None)} ({len(reached)})"
        wtl, gain, baseline, adapted = "-", "-", arms[name][2], arms[name][1] is not None
        if baseline:
            diffs = [a[name].found - a[baseline].found for a in rows]
            wtl = f"{sum(d > 0 for d in diffs)}/{sum(d == 0 for d in diffs)}/{sum(d < 0 for d in diffs)}"
            gain = "{:+.1f} ({:.1f})".format(*paired_gain(rows, name, baseline))
        updates = [r.n_updates for r in results]
        cpu = [a[f"cpu_ms[{name}]"] / a[name].n_updates for a in rows if a[name].n_updates] if adapted else []
        costs = [ms for r in results for ms in r.update_ms]
        lines.append(
            f"| {name} | {100 * statistics.fmean(fractions):.1f}% | {100 * statistics.pstdev(fractions):.1f} | "
            f"{100 * sum(r.found for r in results) / total_targets:.1f}% | {steps['first']} | {steps['middle']} | "
            f"{steps['last']} | {gain} | {wtl} | {fmt(statistics.fmean(updates)) if adapted else '-'} | "
            f"{fmt(statistics.median(costs), '.0f') if costs else '-'} | "
            f"{fmt(statistics.median(cpu), '.0f') if cpu else '-'} |"
        )
    for name in [n for n in names if arms[n][1]]:
        baseline = arms[name][2]
        mean, error = paired_gain(rows, name, baseline)
        lines += [
            "",
            f"{name} minus the {baseline.removeprefix('greedy, ')}, paired over episodes: "
            f"{mean:+.1f} points of fraction found (standard error {error:.1f}).",
        ]
    # the gain by the quality of the zero-shot map
    lines += [
        "",
        "Mean fraction found by the quality of the zero-shot map (AUROC of the cell scores for "
        '"the cell holds a target"; episodes split at the AUROC terciles):',
        "",
        "| zero-shot map AUROC | episodes | " + " | ".join(names) + " |",
        "|---|---|" + "---|" * len(names),
    ]
    ordered = sorted(rows, key=lambda r: r["map_auroc"])
    thirds = [ordered[i * len(ordered) // 3 : (i + 1) * len(ordered) // 3] for i in range(3)]
    for group in thirds:
        if not group:
            continue
        span = f"{group[0]['map_auroc']:.2f}-{group[-1]['map_auroc']:.2f}"
        cells = [f"{100 * statistics.fmean(r[n].found_fraction for r in group if r['n_targets']):.1f}%" for n in names]
        lines.append(f"| {span} | {len(group)} | " + " | ".join(cells) + " |")
    lines += [
        "",
        "Each adapted arm by the same terciles: its paired gain (standard error), its updates per episode, and "
        "the AUROC of the zero-shot -> its last adapted cell scores on the cells it left unvisited (mean over "
        "the episodes where those cells hold targets and non-targets, how many in brackets):",
        "",
        "| arm | zero-shot map AUROC | paired gain (SE) | updates / episode | AUROC on unvisited cells |",
        "|---|---|---|---|---|",
    ]
    for name in [n for n in names if arms[n][1]]:
        for group in thirds:
            if not group:
                continue
            pairs = [r[f"auroc_unvisited[{name}]"] for r in group if not math.isnan(r[f"auroc_unvisited[{name}]"][0])]
            before, after = (statistics.fmean(p[i] for p in pairs) if pairs else None for i in (0, 1))
            lines.append(
                f"| {name} | {group[0]['map_auroc']:.2f}-{group[-1]['map_auroc']:.2f} | {{:+.1f}} ({{:.1f}}) | ".format(
                    *paired_gain(group, name, arms[name][2])
                )
                + f"{statistics.fmean(r[name].n_updates for r in group):.1f} | "
                f"{fmt(before, '.3f')} -> {fmt(after, '.3f')} ({len(pairs)}) |"
            )
    lines += ["", f"Per-episode numbers: `{args.out.stem}_episodes.csv`.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    main()
