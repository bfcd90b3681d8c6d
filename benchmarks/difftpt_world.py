"""Do DiffTPT's generated views on the offline world depict the scene's object? One table.

    python benchmarks/difftpt_world.py --out share.md   # the tables of benchmarks/results/difftpt_world_generator.md

For each image-variation pipeline (default: the world's generator and the tiny RANDOM pipeline, for
contrast) and each number of denoising steps: ``--scenes`` unseen scenes per domain (clean and the
six shifts at ``--severity``; scene seed 10000, the evaluation's), ``--views`` generated views each,
conditioned as DiffTPT conditions (the whole scene as loaded, squashed to the pipeline's input), with
DiffTPT's guidance (3); the share of views that the default world model (``tta-world-resnet``,
zero-shot "a photo of a {}.") classifies as the scene's class (chance: 1/30), beside the model's
zero-shot accuracy on the scenes themselves, and the milliseconds per view.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

from tta.augment.diffusion import TINY_PIPELINE, WORLD_PIPELINE, DiffusionViewGenerator
from tta.models.factory import create_vlm
from tta.validation import check_number
from tta.world import DOMAINS
from tta.world.train_generator import EVAL_SEED, view_class_share


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="markdown file to write the table into")
    parser.add_argument("--pipelines", nargs="+", default=[WORLD_PIPELINE, TINY_PIPELINE], help="pretrained values")
    parser.add_argument("--steps", nargs="+", type=int, default=[10], help="denoising steps to measure")
    parser.add_argument("--domains", nargs="+", default=list(DOMAINS), help="clean and/or shift names")
    parser.add_argument("--scenes", type=int, default=50, help="scenes per domain")
    parser.add_argument("--views", type=int, default=8, help="generated views per scene")
    parser.add_argument("--severity", type=int, default=3, help="shift severity, 1-5")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    parser.add_argument("--device", default="cpu", help="torch device of the pipeline and the model, e.g. cuda")
    parser.add_argument("--batch-size", type=int, default=32, help="views per pipeline call (no effect on results)")
    args = parser.parse_args(argv)
    check_number("--scenes", args.scenes, 1, integer=True)
    check_number("--views", args.views, 1, integer=True)
    check_number("--severity", args.severity, 1, 5, integer=True)
    check_number("--threads", args.threads, 1, integer=True)
    check_number("--batch-size", args.batch_size, 1, integer=True)
    for steps in args.steps:
        check_number("--steps", steps, 1, integer=True)
    unknown = [d for d in args.domains if d not in DOMAINS]
    if unknown:
        parser.error(f"--domains: unknown {unknown}; choose from {list(DOMAINS)}")
    torch.set_num_threads(args.threads)
    vlm = create_vlm("tta-world-resnet").to(args.device)
    timer = time.process_time if args.device == "cpu" else time.perf_counter
    columns = " | ".join(args.domains)
    lines = [
        f"| pipeline | denoising steps | {columns} | shifted mean | ms / view |",
        "|---" * (len(args.domains) + 4) + "|",
    ]
    parts = [
        f"| pipeline | denoising steps | share | {columns} | shifted mean |",
        "|---" * (len(args.domains) + 4) + "|",
    ]

    def row(values: dict[str, float]) -> str:
        shifted = [values[d] for d in args.domains if d != "clean"]
        mean = f"{100 * sum(shifted) / len(shifted):.1f}" if shifted else ""
        return " | ".join(f"{100 * values[d]:.1f}" for d in args.domains) + f" | {mean}"

    for pretrained in args.pipelines:
        for steps in args.steps:
            generator = DiffusionViewGenerator(
                pretrained=pretrained,
                n_views=args.views,
                num_inference_steps=steps,
                output_size=64,
                batch_size=args.batch_size,
                dtype="float32",
                cache_dir=None,
            ).load(args.device)
            shares, began = {}, timer()
            for domain in args.domains:
                shares[domain] = view_class_share(
                    generator, vlm, args.scenes, domain, args.severity, EVAL_SEED, args.device
                )
                print(pretrained, steps, domain, shares[domain], flush=True)
            ms = 1000 * (timer() - began) / (args.scenes * args.views * len(args.domains))
            lines.append(
                f"| {pretrained} | {steps} | {row({d: shares[d]['class'] for d in args.domains})} | {ms:.1f} |"
            )
            for key in ("colour", "shape"):
                parts.append(f"| {pretrained} | {steps} | {key} | {row({d: shares[d][key] for d in args.domains})} |")
        autoencoder = row({d: shares[d]["autoencoder"] for d in args.domains})
        parts.append(f"| {pretrained} | | autoencoder round trip | {autoencoder} |")
    sources = row({d: shares[d]["source"] for d in args.domains})
    lines.append(f"| (the scenes themselves: zero-shot accuracy) | | {sources} | |")
    command = "python benchmarks/difftpt_world.py " + " ".join(sys.argv[1:] if argv is None else argv)
    text = (
        f"Share (%) of generated views classified as the source scene's class by tta-world-resnet, "
        f"{args.scenes} scenes x {args.views} views per domain, severity {args.severity}, guidance 3 "
        f"(chance 3.3%); ms per view (generation, rendering and classification): process CPU time with "
        f"{args.threads} thread(s) on the CPU, wall time on a GPU ({args.device}); pipelines in float32.\n\n"
        f"    {command}\n\n" + "\n".join(lines) + "\n\n"
        "Where the views fail: the share predicted with the scene's colour (any shape; chance 20%) and with "
        "its shape (any colour; chance 16.7%), and the share of scenes whose autoencoder round trip (encode + "
        "decode, no diffusion: the best the decoder allows) is classified as their class.\n\n" + "\n".join(parts) + "\n"
    )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(text)
    print(text)


if __name__ == "__main__":
    main()
