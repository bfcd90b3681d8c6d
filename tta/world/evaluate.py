"""The recipe's evaluation: the properties of the offline world and a model, in one table.

    python -m tta.world.evaluate                               # the default model, severity 3
    python -m tta.world.evaluate --model tta-world-resnet
    python -m tta.world.evaluate --severities 1 2 3 4 5        # accuracy per shift and severity

Scenes are rendered as originals (``ORIGINAL_SIZE`` px, stored as uint8 as the datamodule
stores them) and resized + centre-cropped to the model input as real images are. Per domain
(clean, and every shift at the severity): zero-shot accuracy ("a photo of a {}."), top-label
ECE (15 bins, as ``tta-predict`` reports it) and the 5-NN label agreement of the image features
(how well the features cluster by class, what batch methods such as LAME rely on). On clean,
the augmentation-only baseline, by the code ``tta=views`` runs: the model input plus 63 views
cropped from the original (torchvision's RandomResizedCrop boxes, scale 0.08-1, + horizontal
flip), the 10% most confident averaged. Below the table: how much of the image the main
object's box covers, and the share of those crops that keep a quarter of it in view.
"""

from __future__ import annotations

import argparse
import dataclasses
import json

import torch

from tta.augment.views import crop_boxes, make_views
from tta.datamodules.preprocess import Preprocess
from tta.methods.views import confident_view_average
from tta.metrics import classification_metrics
from tta.models.factory import create_vlm
from tta.models.vlm import VisionLanguageModel
from tta.world import CLASS_NAMES, DOMAINS, ORIGINAL_SIZE, SHIFTS, render_domain, render_shifted
from tta.world.scenes import Scenes

DEFAULT_MODEL = "tta-world-resnet"
TEMPLATES = ("a photo of a {}.",)


def _model_inputs(vlm: VisionLanguageModel, originals: torch.Tensor) -> torch.Tensor:
    """The model inputs made from uint8 originals as ``tta-predict`` makes them: by the model's
    own preprocessing (size, resize mode, interpolation)."""
    preprocess = Preprocess(vlm.image_size[0], vlm.resize_mode, vlm.interpolation)
    return torch.stack([preprocess(original) for original in originals])


@torch.no_grad()
def _zero_shot(
    vlm: VisionLanguageModel, images: torch.Tensor, batch_size: int = 250
) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits and normalised image features of model inputs."""
    text = vlm.class_text_features(CLASS_NAMES, TEMPLATES)
    features = vlm.encode_image(images, batch_size=batch_size)
    return vlm.logits(features, text), features


def knn_agreement(features: torch.Tensor, labels: torch.Tensor, k: int = 5) -> float:
    """Mean share of each sample's ``k`` nearest neighbours (cosine, itself excluded) that share its label."""
    similarity = features @ features.T
    similarity.fill_diagonal_(-float("inf"))
    neighbours = similarity.topk(k, dim=1).indices
    return (labels[neighbours] == labels[:, None]).float().mean().item()


def _domain_row(vlm: VisionLanguageModel, scenes: Scenes) -> dict:
    images = _model_inputs(vlm, scenes.originals())
    logits, features = _zero_shot(vlm, images)
    probs = logits.softmax(-1)
    confidence, pred = probs.max(-1)
    row = classification_metrics(pred, scenes.labels, confidence)
    row["confidence"] = confidence.mean().item()
    row["knn_agreement"] = knn_agreement(features, scenes.labels)
    return row


@torch.no_grad()
def view_baseline(vlm: VisionLanguageModel, scenes: Scenes, n_views: int = 64, seed: int = 0) -> dict:
    """Accuracy of the augmentation-only baseline, made as ``tta=views`` makes it (the model input
    + ``n_views - 1`` crops of the original by :func:`tta.augment.make_views`, scene ``k`` drawing
    from seed ``seed + k``; the 10% most confident averaged), and the share of crops keeping at
    least a quarter of the main object's box."""
    text = vlm.class_text_features(CLASS_NAMES, TEMPLATES)
    originals = scenes.originals()
    images = _model_inputs(vlm, originals)
    correct, in_view = 0, []
    for k, (original, image, label, box) in enumerate(zip(originals, images, scenes.labels, scenes.boxes)):
        views = make_views([original], image[None], n_views, [seed + k])[0]
        averaged, _ = confident_view_average(vlm.logits(vlm.encode_image(views), text)[None])
        correct += int(averaged.argmax(-1).item() == label.item())
        # the same boxes make_views cut: the first draw of the scene's generator
        boxes, _ = crop_boxes(torch.Generator().manual_seed(seed + k), n_views - 1, *original.shape[1:])
        left, top, width, height = boxes.unbind(1)
        overlap_x = (torch.minimum(box[2], left + width) - torch.maximum(box[0], left)).clamp(min=0)
        overlap_y = (torch.minimum(box[3], top + height) - torch.maximum(box[1], top)).clamp(min=0)
        shown = overlap_x * overlap_y / ((box[2] - box[0]) * (box[3] - box[1]))
        in_view.append((shown >= 0.25).float().mean())
    return {
        "n": len(originals),
        "accuracy": correct / len(originals),
        "crops_in_view": torch.stack(in_view).mean().item(),
    }


def world_properties(
    model: str = DEFAULT_MODEL,
    n: int = 1000,
    severity: int = 3,
    seed: int = 10_000,
    views_n: int = 300,
    render_size: int = ORIGINAL_SIZE,
    n_views: int = 64,
) -> dict:
    """Zero-shot accuracy, ECE and 5-NN agreement per domain at ``severity``, the view baseline
    on ``views_n`` clean scenes, and the object's coverage. The default seed differs from every
    training seed, so the scenes are unseen."""
    vlm = create_vlm(model)
    domains = {}
    for domain in DOMAINS:
        scenes = render_domain(domain, severity, n, seed, render_size)
        domains[domain] = _domain_row(vlm, scenes)
        if domain == "clean":
            area = (scenes.boxes[:, 2] - scenes.boxes[:, 0]) * (scenes.boxes[:, 3] - scenes.boxes[:, 1])
            box_fraction = area / render_size**2
    views = view_baseline(vlm, render_domain("clean", severity, views_n, seed, render_size), n_views)
    shifted = [domains[d] for d in DOMAINS if d != "clean"]
    return {
        "model": model,
        "n": n,
        "severity": severity,
        "seed": seed,
        "render_size": render_size,
        "image_size": vlm.image_size[0],
        "logit_scale": vlm.logit_scale.item(),
        "domains": domains,
        "shifted_mean": {key: sum(d[key] for d in shifted) / len(shifted) for key in ("accuracy", "ece")},
        "views": views,
        "object_box_fraction": {
            "min": box_fraction.min().item(),
            "mean": box_fraction.mean().item(),
            "max": box_fraction.max().item(),
        },
    }


def print_properties(p: dict) -> None:
    print(
        f"{p['model']} (logit scale {p['logit_scale']:.1f}) · {p['n']} scenes per domain (seed {p['seed']}) · "
        f"severity {p['severity']} · originals {p['render_size']} px -> model input {p['image_size']} px"
    )
    print("| domain | zero-shot accuracy % | ECE | 5-NN agreement % | view baseline % |")
    print("|---|---|---|---|---|")
    for name, row in p["domains"].items():
        views = f"{100 * p['views']['accuracy']:.1f} (n={p['views']['n']})" if name == "clean" else ""
        print(
            f"| {name} | {100 * row['accuracy']:.1f} | {row['ece']:.3f} | {100 * row['knn_agreement']:.1f} | {views} |"
        )
    mean = p["shifted_mean"]
    print(f"| shifted mean | {100 * mean['accuracy']:.1f} | {mean['ece']:.3f} | | |")
    box = p["object_box_fraction"]
    print(
        f"main object's box: {100 * box['min']:.1f}-{100 * box['max']:.1f}% of the image "
        f"(mean {100 * box['mean']:.1f}%); "
        f"crops (scale 0.08-1) keeping >= 25% of it in view: {100 * p['views']['crops_in_view']:.1f}%"
    )


@torch.no_grad()
def accuracy_table(
    model: str = DEFAULT_MODEL,
    n: int = 1000,
    severities: tuple[int, ...] = (1, 2, 3, 4, 5),
    seed: int = 10_000,
    render_size: int = ORIGINAL_SIZE,
    levels: dict[str, tuple[float, ...]] | None = None,
) -> dict[str, dict[str, dict]]:
    """``{domain: {severity: {"accuracy", "ece", "confidence"}}}`` ("clean" has severity 0 only). ``levels``
    replaces a shift's severity table by trial levels, any number, to calibrate it:
    ``{"blur": (1.0, 1.5, ...)}`` (trial level k under the key ``str(k + 1)``)."""
    vlm = create_vlm(model)
    clean = _domain_row(vlm, render_domain("clean", 1, n, seed, render_size))
    table: dict[str, dict[str, dict]] = {"clean": {"0": {k: clean[k] for k in ("accuracy", "ece", "confidence")}}}
    for name, shift in SHIFTS.items():
        if levels is not None and name in levels:  # trial level k as severity k + 1
            cells = {str(k + 1): (dataclasses.replace(shift, levels=(lv,) * 5), 1) for k, lv in enumerate(levels[name])}
        else:
            cells = {str(s): (shift, s) for s in severities}
        for key, (trial, severity) in cells.items():
            row = _domain_row(vlm, render_shifted(name, trial, severity, n, seed, render_size))
            table.setdefault(name, {})[key] = {k: row[k] for k in ("accuracy", "ece", "confidence")}
    return table


#: Trial levels per shift, from weak to strong (in the units of ``tta.world.SHIFTS``), and the
#: zero-shot accuracy each severity is calibrated to.
CALIBRATION_GRID: dict[str, tuple[float, ...]] = {
    "noise": (0.02, 0.04, 0.06, 0.08, 0.1, 0.12, 0.16, 0.2, 0.28, 0.4),
    "blur": (0.5, 1.0, 1.5, 2.0, 2.5, 3.0, 3.5, 4.0, 5.0, 6.0),
    "contrast": (0.9, 0.7, 0.5, 0.4, 0.3, 0.25, 0.2, 0.15, 0.1, 0.06),
    "sketch": (16.0, 12.0, 10.0, 8.0, 6.0, 4.5, 3.5, 2.5, 1.8, 1.2),
    "texture": (0.05, 0.1, 0.15, 0.2, 0.25, 0.3, 0.4, 0.5, 0.6, 0.8),
    "hue": (0.03, 0.05, 0.06, 0.07, 0.08, 0.09, 0.1, 0.12, 0.15, 0.2),
}
CALIBRATION_TARGETS = (0.85, 0.7, 0.5, 0.35, 0.2)


def calibrate_levels(
    model: str = DEFAULT_MODEL, n: int = 500, seed: int = 20_000, grid: dict[str, tuple[float, ...]] = CALIBRATION_GRID
) -> dict[str, dict]:
    """Each shift's zero-shot accuracy over its trial levels, and the five levels whose
    accuracy is ``CALIBRATION_TARGETS`` (linear interpolation between trial levels; the ends of
    the grid where a target lies outside it). Scenes of ``seed``, apart from the evaluation's."""
    table = accuracy_table(model, n, seed=seed, levels=grid)
    out = {}
    for name, levels in grid.items():
        accuracy = [table[name][str(k + 1)]["accuracy"] for k in range(len(levels))]
        chosen = []
        for target in CALIBRATION_TARGETS:
            level = levels[0] if accuracy[0] <= target else levels[-1]
            for k in range(len(levels) - 1):
                a, b = accuracy[k], accuracy[k + 1]
                if a >= target >= b and a > b:
                    level = levels[k] + (a - target) / (a - b) * (levels[k + 1] - levels[k])
                    break
            chosen.append(round(level, 3))
        out[name] = {"trial_levels": list(levels), "accuracy": accuracy, "levels": chosen}
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="properties of the offline world and a model, in one table")
    parser.add_argument("--model", default=DEFAULT_MODEL, help="a model name for tta.models.create_vlm")
    parser.add_argument("--n", type=int, default=1000, help="scenes per domain")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--views-n", type=int, default=300, help="clean scenes for the view baseline (64 views each)")
    parser.add_argument("--severities", type=int, nargs="+", help="instead: accuracy and ECE per shift and severity")
    parser.add_argument(
        "--levels", type=json.loads, help="with --severities: trial severity tables, e.g. '{\"blur\": [1, 2, 3]}'"
    )
    parser.add_argument(
        "--calibrate",
        action="store_true",
        help="instead: the severity levels at which the model's accuracy is 85/70/50/35/20%%",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of tables")
    args = parser.parse_args(argv)
    if args.calibrate:
        for name, row in calibrate_levels(args.model, args.n).items():
            trials = ", ".join(f"{lv:g}: {100 * a:.1f}%" for lv, a in zip(row["trial_levels"], row["accuracy"]))
            print(f"{name:9s} levels {tuple(row['levels'])}  (trials {trials})")
        return
    if args.severities:
        table = accuracy_table(args.model, args.n, tuple(args.severities), levels=args.levels)
        if args.json:
            print(json.dumps(table, indent=2))
            return
        for domain, cells in table.items():
            print(
                f"{domain:9s}",
                "  ".join(f"{s}: {100 * c['accuracy']:5.1f}% ECE {c['ece']:.3f}" for s, c in cells.items()),
            )
        return
    properties = world_properties(args.model, args.n, args.severity, views_n=args.views_n)
    print(json.dumps(properties, indent=2)) if args.json else print_properties(properties)


if __name__ == "__main__":
    main()
