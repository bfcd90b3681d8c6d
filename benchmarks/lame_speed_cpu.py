"""LAME's cost next to zero-shot prediction: a batch of 64 offline-world images on the CPU.

    python benchmarks/lame_speed_cpu.py [--repeats 30]

Times (median of ``repeats``, after warm-up) the zero-shot forward of one batch (image tower +
logits against cached class features) and ``laplacian_adjust`` on its outputs for each affinity,
and prints LAME's share of the zero-shot time (target: at most 10% added for rbf).
"""

from __future__ import annotations

import argparse

import torch
from timing import median_ms

from tta.methods.lame import laplacian_adjust
from tta.models import create_vlm
from tta.tasks import ZeroShotClassifier
from tta.world import CLASS_NAMES, render_domain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--batch", type=int, default=64)
    args = parser.parse_args()
    module = ZeroShotClassifier(create_vlm("tta-world-resnet"), class_names=CLASS_NAMES).eval()
    images = render_domain("blur", 3, args.batch, seed=10_000).images
    with torch.inference_mode():
        out = module(images)
        zero_shot = median_ms(lambda: module(images), args.repeats)
        rows = [
            (
                affinity,
                median_ms(lambda a=affinity: laplacian_adjust(out["probs"], out["image_features"], a), args.repeats),
            )
            for affinity in ("rbf", "knn", "linear")
        ]
    print(f"batch of {args.batch}, {len(CLASS_NAMES)} classes, tiny CLIP, {torch.get_num_threads()} CPU threads")
    print("| step | ms per batch | added to zero-shot |")
    print("|---|---|---|")
    print(f"| zero-shot forward | {zero_shot:.2f} | - |")
    for affinity, ms in rows:
        print(f"| LAME ({affinity}) | {ms:.2f} | {100 * ms / zero_shot:.1f}% |")


if __name__ == "__main__":
    main()
