"""Diffusion-view generation cost on the CPU with the TINY RANDOM image-variation pipeline.

    python benchmarks/difftpt_generation_cpu.py [--images 2] [--threads 1]

The tiny pipeline (``tta-tiny-image-variation``: 16 x 16 latents, a two-block UNet, random
weights) checks DiffTPT's plumbing offline; its timings are NOT those of Stable Diffusion (see
the README for the real-weights estimate). Prints ms per generated view (63 views per image,
guidance 3, batches of 32 views) for a few step counts, and ms per image to read the cached views.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import torch

from tta.augment import TINY_PIPELINE, DiffusionViewGenerator
from tta.world import render_domain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    images = render_domain("blur", 3, args.images, seed=10_000).images
    seeds = list(range(args.images))
    print(
        f"tiny random pipeline ({TINY_PIPELINE}), {args.images} world images x 63 views, guidance 3, "
        f"batches of 32 views, {args.threads} CPU thread(s)"
    )
    print("| denoising steps | ms / view (generation) | ms / image (cache read, 63 views) |")
    print("|---|---|---|")
    for steps in (2, 10, 50):
        with tempfile.TemporaryDirectory() as cache:
            generator = DiffusionViewGenerator(
                TINY_PIPELINE, num_inference_steps=steps, output_size=64, cache_dir=cache
            ).load()
            generator.views(images[:1], [999])  # warm-up
            start = time.perf_counter()
            generator.views(images, seeds)
            generate_ms = 1000 * (time.perf_counter() - start) / (args.images * generator.n_views)
            start = time.perf_counter()
            generator.views(images, seeds)
            read_ms = 1000 * (time.perf_counter() - start) / args.images
            print(f"| {steps} | {generate_ms:.1f} | {read_ms:.2f} |")


if __name__ == "__main__":
    main()
