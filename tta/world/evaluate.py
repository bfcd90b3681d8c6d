"""Zero-shot accuracy of a model on the offline world, per domain and severity.

    python -m tta.world.evaluate --model tta-world-clip --severities 1 2 3 4 5

Used by the training recipe (the table in the README) and to calibrate the shift severities.
"""

from __future__ import annotations

import argparse
import json

import torch

from tta.models.factory import create_vlm
from tta.world import CLASS_NAMES, DOMAINS, render_domain


@torch.no_grad()
def accuracy_table(
    model: str,
    n: int = 1000,
    severities: tuple[int, ...] = (3,),
    seed: int = 10_000,
    templates: tuple[str, ...] = ("a photo of a {}.",),
    batch_size: int = 500,
) -> dict[str, dict[int, float]]:
    """``{domain: {severity: top-1 accuracy}}``; "clean" has severity 0 only.

    The default seed differs from every training seed, so the scenes are unseen.
    """
    vlm = create_vlm(model)
    text = vlm.class_text_features(CLASS_NAMES, templates)
    table: dict[str, dict[int, float]] = {}
    for domain in DOMAINS:
        for severity in (0,) if domain == "clean" else severities:
            scenes = render_domain(domain, max(severity, 1), n, seed)
            correct = 0
            for start in range(0, n, batch_size):
                images = scenes.images[start : start + batch_size]
                pred = vlm.logits(vlm.encode_image(images), text).argmax(-1)
                correct += (pred == scenes.labels[start : start + batch_size]).sum().item()
            table.setdefault(domain, {})[severity] = correct / n
    return table


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="zero-shot accuracy on the offline world")
    parser.add_argument("--model", default="tta-world-clip", help="a model name for tta.models.create_vlm")
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--severities", type=int, nargs="+", default=[3])
    args = parser.parse_args(argv)
    table = accuracy_table(args.model, args.n, tuple(args.severities))
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
