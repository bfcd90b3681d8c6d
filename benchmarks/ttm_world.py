"""TTM on the offline world's compositional 2 x 2 groups with a shipped world model (CPU).

    python benchmarks/ttm_world.py [--model tta-world-pairs] [--out benchmarks/results/ttm_world_pairs.md] [--threads 1]

1. Zero-shot composition sweep: raw GroupScore / GroupMatch of every swap kind (relation,
   colour, shape) on the clean domain and every shift at severities 1 and 3 (``--sweep-n`` groups
   a cell): the measurement behind the benchmark's composition (``configs/data/world_groups.yaml``).
2. TTM, through ``Trainer.predict`` with the ``TTM`` callback and ``GroupScorer``, on the
   composition (colour and shape swaps, clean) and on the same swaps under mild shifts
   (noise@1, texture@1): raw GroupScore / GroupMatch, GroupScore / GroupMatch after TTM, per
   kind and domain, and the wall time of every round.

The TTM schedule is the card's (``configs/experiment/ttm_world.yaml``): 10 rounds, tau 2.0 -> 0,
10 epochs a round, peak lr 3e-4 (``--lr``/``--epochs`` to change it; the reference's defaults are
lr 1e-5, 30 epochs). The model is the card's (``tta-world-pairs``) unless ``--model`` names another.
With random scores a 2 x 2 group's GroupScore is 1/6 (both diagonal scores the top two of four:
2! 2! / 4!) and its GroupMatch 1/2 (one of the two matchings).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import pytorch_lightning as pl
import torch

from tta.callbacks import TTM
from tta.datamodules import WorldGroupsDataModule
from tta.metrics.groups import group_match, group_score
from tta.models import create_vlm
from tta.tasks import GroupScorer
from tta.world import SHIFTS
from tta.world.groups import SWAP_KINDS, render_groups


@torch.no_grad()
def sweep(vlm, n: int, seed: int) -> list[str]:
    cells = [("clean", 1)] + [(shift, s) for s in (1, 3) for shift in SHIFTS]
    lines = [
        "| kind | " + " | ".join("clean" if d == "clean" else f"{d}@{s}" for d, s in cells) + " |",
        "|---|" + "---:|" * len(cells),
    ]
    for kind in SWAP_KINDS:
        values = []
        for domain, severity in cells:
            groups = render_groups(kind, n, seed, domain, severity)
            images = vlm.encode_image(groups.images.flatten(0, 1), batch_size=256).view(n, 2, -1)
            texts = vlm.encode_text(vlm.tokenize([c for pair in groups.captions for c in pair])).view(n, 2, -1)
            scores = vlm.logits(images, texts)
            values.append(
                f"{100 * group_score(scores).float().mean():.1f} / {100 * group_match(scores).float().mean():.1f}"
            )
        lines.append(f"| {kind} | " + " | ".join(values) + " |")
    return lines


def run_ttm(vlm, domains: list[str], n_per_cell: int, seed: int, lr: float, epochs: int) -> tuple[dict, TTM, float]:
    module = GroupScorer(vlm)
    datamodule = WorldGroupsDataModule(
        kinds=["colour", "shape"], domains=domains, n_per_cell=n_per_cell, seed=seed, image_size=vlm.image_size[0]
    )
    callback = TTM(lr=lr, epochs=epochs)
    trainer = pl.Trainer(
        callbacks=[callback], logger=False, enable_progress_bar=False, enable_model_summary=False, accelerator="cpu"
    )
    start = time.perf_counter()
    outputs = trainer.predict(module, datamodule=datamodule)
    seconds = time.perf_counter() - start
    rows = [
        {k: "" if v is None else str(v) for k, v in row.items()}
        for out in outputs
        for row in module.prediction_rows(out)
    ]
    return module.summarize_predictions(rows), callback, seconds


def effect_table(summary: dict) -> list[str]:
    lines = [
        "| kind / domain | groups | GroupScore raw | GroupMatch raw | GroupScore TTM | GroupMatch TTM | "
        "text / image score raw | text / image score TTM |",
        "|---|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def row(name: str, m: dict) -> str:
        pct = {k: 100 * v for k, v in m.items() if isinstance(v, float)}
        return (
            f"| {name} | {m['n']} | {pct['group_score_zs']:.1f} | {pct['group_match_zs']:.1f} | "
            f"{pct['group_score']:.1f} | {pct['group_match']:.1f} | {pct['text_score_zs']:.1f} / "
            f"{pct['image_score_zs']:.1f} | {pct['text_score']:.1f} / {pct['image_score']:.1f} |"
        )

    for kind, m in summary["kinds"].items():
        lines.append(row(f"kind {kind}", m))
    for domain, m in summary["domains"].items():
        lines.append(row(f"domain {domain}", m))
    lines.append(row("**all**", summary))
    return lines


def rounds_table(callback: TTM) -> list[str]:
    lines = [
        "| round | tau | peak lr | pseudo-labelled groups | their precision | steps | seconds |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in callback.ttm_rounds:
        precision = "-" if r["precision"] is None else f"{100 * r['precision']:.1f}%"
        lines.append(
            f"| {r['round']} | {r['tau']:.2f} | {r['peak_lr']:.2e} | {r['selected']} | {precision} | "
            f"{r['steps']} | {r['seconds']:.1f} |"
        )
    total = sum(r["seconds"] for r in callback.ttm_rounds)
    lines.append(
        f"| all | | | | | {sum(r['steps'] for r in callback.ttm_rounds)} | {total:.1f} "
        f"({total / len(callback.ttm_rounds):.1f} per round) |"
    )
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "ttm_world_pairs.md")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument(
        "--model",
        default="tta-world-pairs",
        help="a world model (TTM's loss follows it: InfoNCE for a CLIP, sigmoid for a model with a logit bias)",
    )
    parser.add_argument("--sweep-n", type=int, default=200)
    parser.add_argument("--n-per-cell", type=int, default=150, help="groups per kind and domain for TTM")
    parser.add_argument("--seed", type=int, default=10_000)
    parser.add_argument("--lr", type=float, default=3e-4)
    parser.add_argument("--epochs", type=int, default=10)
    parser.add_argument("--skip-shifted", action="store_true", help="only the clean composition")
    parser.add_argument("--skip-sweep", action="store_true", help="no zero-shot composition sweep")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    pl.seed_everything(0, verbose=False)
    vlm = create_vlm(args.model)
    start = time.perf_counter()
    lines = [
        f"# TTM on the offline world's compositional groups ({args.model}, CPU, {args.threads} thread(s))",
        "",
        f"`python benchmarks/ttm_world.py {' '.join(sys.argv[1:])}`; groups of seed {args.seed}.",
        "",
        "Chance with random scores: GroupScore 16.7% (1/6), GroupMatch 50% (1/2).",
        "",
    ]
    if not args.skip_sweep:
        lines += [
            f"## Zero-shot GroupScore / GroupMatch (%) per swap kind and domain, {args.sweep_n} groups a cell",
            "",
            *sweep(vlm, args.sweep_n, args.seed),
        ]
    print("\n".join(lines), flush=True)
    sets = [("colour and shape swaps, clean", ["clean"], args.n_per_cell)]
    if not args.skip_shifted:
        sets.append(("colour and shape swaps under mild shifts", ["noise@1", "texture@1"], args.n_per_cell // 2))
    for title, domains, n in sets:
        summary, callback, seconds = run_ttm(vlm, domains, n, args.seed, args.lr, args.epochs)
        block = [
            "",
            f"## TTM: {title} ({summary['n']} groups; lr {args.lr:g}, {args.epochs} epochs a round, "
            f"10 rounds; predict incl. TTM {seconds:.0f} s)",
            "",
        ]
        block += [*effect_table(summary), "", "Rounds:", "", *rounds_table(callback)]
        print("\n".join(block), flush=True)
        lines += block
    lines += ["", f"Total benchmark time: {time.perf_counter() - start:.0f} s."]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
