"""What limits TPT, STS and LAME on the offline world: measured, not tuned (issue 25, point 4).

    python benchmarks/world_limits.py [--n 200] [--out benchmarks/results/world_limits.md] [--threads 1]

Three measurements, one table each, all at the methods' published settings:

1. **One step's size, against a real architecture.** TPT's first AdamW step from a fresh state
   moves every context coordinate by about ``lr`` (``-lr * sign(grad)``, plus weight decay), so the
   step's size in the context is fixed by the width and ``lr`` alone; what it does to the class
   text features depends on the text tower. For the shipped world models and for CLIP's
   architectures at their real size (``ViT-B-16``, ``RN50``: random weights, which give the scale
   of a real tower, not its trained values; ``--scale-models ViT-B-16@openai`` measures the trained
   tower where its weights are at hand), with the world's 30 class names and the prompt "a
   photo of a {}.": the context tokens' norm, the step's norm per token, and the mean change of the
   class text features (``|t' - t|``) for a step of ``lr`` along random signs (20 draws), beside the
   mean distance between two classes' text features (``|t_c - t_c'|``): the step's reach in units of
   the class spacing.
2. **Per domain, what the views know and what one step does with it** (the world model, ``n``
   scenes a domain at severity 3, seed 10000 as ``tta-predict``'s default data; 64 crop + flip
   views, scene ``k`` seeded ``k``): zero-shot accuracy, mean confidence and the cosine margin
   between the first and second class; the 10% most confident views (6 of 64): the share that name
   the label, their agreement (share naming the kept views' majority class) and the accuracy of
   their average (the views baseline, which STS's prediction is built on); TPT's accuracy after
   its one step (lr 5e-3) and after 4 steps, the predictions the step changes, the change of the
   class text features, and the share of the views' reach it captures: of the scenes the
   confident views get right and the original gets wrong, how many TPT turns right. STS: its
   accuracy (its prediction is the kept views' average over the steered prototypes) and how
   far its prototypes move.
3. **LAME's neighbourhoods**: per domain, the share of each image's 5 nearest neighbours (cosine)
   that share its label among all ``n`` images (how well the features cluster by class), and
   within i.i.d. batches of 64 drawn from the whole stream of every domain (the batches LAME
   adjusts); the mean top probability (the weight of LAME's unary term).

Published figures to compare with (CLIP ViT-B/16, ImageNet-A; ``../shared/METHODS.md``): zero-shot
47.87, TPT 54.77, ZERO (a vote of the confident views) 59.61: TPT captures 59% of the confident
views' gain there.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from open_clip.model import CLIP

from tta.augment import make_views
from tta.methods.entropy import gather_views
from tta.methods.sts import spectral_basis, sts_adapt
from tta.methods.tpt import tpt_adapt
from tta.methods.views import confident_view_average
from tta.models import create_vlm
from tta.models.factory import ASSET_DIR
from tta.models.prompt import PromptLearner
from tta.models.vlm import VisionLanguageModel
from tta.world import CLASS_NAMES, DOMAINS, ORIGINAL_SIZE, render_domain
from tta.world.evaluate import _model_inputs, knn_agreement
from tta.world.scenes import CAPTION_TEMPLATES

SCALE_MODELS = ("tta-world-resnet", "tta-world-resnet@random", "tta-world-vit", "ViT-B-16", "RN50")
#: prompts that name the image's style, as CLIP's 80 ImageNet templates do ("a blurry photo of a {}.",
#: "a sketch of a {}.", ...), each beside the shift it describes
STYLE_PROMPTS = {
    "noise": "a noisy photo of a {}.",
    "blur": "a blurry photo of a {}.",
    "contrast": "a low contrast photo of a {}.",
    "sketch": "a sketch of a {}.",
    "texture": "a photo of a {} on a patterned background.",
    "hue": "a photo of a {} in odd colours.",
}
LR = 5e-3  # TPT's and STS's published step size


def random_init(name: str):
    """A shipped world model's architecture with fresh (random) weights: open_clip's own initialisation."""
    trained = create_vlm(name)
    config = json.loads((ASSET_DIR / name / "open_clip_config.json").read_text())["model_cfg"]
    torch.manual_seed(0)
    return VisionLanguageModel(CLIP(**config).eval(), trained.tokenizer, trained.preprocess_cfg, f"{name}@random")


def step_scale(name: str, draws: int = 20, seed: int = 0) -> dict:
    """Context norm, step norm and the class text features' move for steps of ``LR`` along random signs."""
    model, _, tag = name.partition("@")
    vlm = random_init(model) if tag == "random" else create_vlm(model, pretrained=tag or None)
    prompt = PromptLearner(vlm, CLASS_NAMES)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        initial = prompt.text_features(prompt.initial_context)
        spacing = torch.cdist(initial, initial)
        off_diagonal = ~torch.eye(len(CLASS_NAMES), dtype=torch.bool)
        signs = torch.randint(0, 2, (draws, *prompt.initial_context.shape), generator=g).float() * 2 - 1
        moved = prompt.text_features(prompt.initial_context + LR * signs)  # draws x C x D
        move = (moved - initial).norm(dim=-1).mean().item()
    width = prompt.initial_context.shape[1]
    return {
        "model": name,
        "width": width,
        "ctx_norm": prompt.initial_context.norm(dim=-1).mean().item(),
        "step_norm": LR * math.sqrt(width),
        "move": move,
        "spacing": spacing[off_diagonal].mean().item(),
        "nearest": spacing.masked_fill(~off_diagonal, float("inf")).min(1).values.mean().item(),
    }


@torch.no_grad()
def encode_views(vlm, scenes, n_views: int, batch: int = 16) -> torch.Tensor:
    originals = scenes.originals()
    images = _model_inputs(vlm, originals)
    out = []
    for i in range(0, len(images), batch):
        views = make_views(
            originals[i : i + batch], images[i : i + batch], n_views, list(range(i, i + len(images[i : i + batch])))
        )
        out.append(vlm.encode_image(views.flatten(0, 1)).view(views.shape[0], n_views, -1))
    return torch.cat(out)


def domain_row(
    vlm, prompt: PromptLearner, domain: str, n: int, severity: int, seed: int, n_views: int
) -> tuple[dict, torch.Tensor, torch.Tensor]:
    scenes = render_domain(domain, severity, n, seed, size=ORIGINAL_SIZE)
    labels = scenes.labels
    features = encode_views(vlm, scenes, n_views)  # n x V x D
    logit_fn = vlm.logits
    with torch.no_grad():
        text = prompt.text_features(prompt.initial_context)
        logits = logit_fn(features, text)  # n x V x C
        original = logits[:, 0]
        cos = features[:, 0] @ text.T
        top2 = cos.topk(2, dim=-1).values
        averaged, kept = confident_view_average(logits)
        kept_pred = gather_views(logits, kept).argmax(-1)  # n x k
        majority = kept_pred.mode(dim=1).values
    row: dict = {"domain": domain}
    right0 = original.argmax(-1) == labels
    row["zero_shot"] = right0.float().mean().item()
    row["confidence"] = original.softmax(-1).max(-1).values.mean().item()
    row["margin"] = (top2[:, 0] - top2[:, 1]).median().item()
    row["kept_right"] = (kept_pred == labels[:, None]).float().mean().item()
    row["kept_agree"] = (kept_pred == majority[:, None]).float().mean().item()
    views_right = averaged.argmax(-1) == labels
    row["views"] = views_right.float().mean().item()
    reach = views_right & ~right0
    for steps in (1, 4):
        adapted = tpt_adapt(prompt, features, logit_fn, lr=LR, steps=steps)
        right = adapted.logits.argmax(-1) == labels
        row[f"tpt{steps}"] = right.float().mean().item()
        if steps == 1:
            with torch.no_grad():
                moved = prompt.text_features(adapted.variables)  # n x C x D
            row["tpt_move"] = (moved - text).norm(dim=-1).mean().item()
            row["tpt_changed"] = (adapted.logits.argmax(-1) != original.argmax(-1)).float().mean().item()
        row[f"tpt{steps}_reach"] = (right & reach).sum().item() / max(1, int(reach.sum()))
    row["reach"] = reach.float().mean().item()
    class_features = text
    sts = sts_adapt(features, class_features, spectral_basis(class_features), logit_fn, lr=LR)
    row["sts"] = (sts.logits.argmax(-1) == labels).float().mean().item()
    row["sts_move"] = (sts.variables @ spectral_basis(class_features)).norm(dim=-1).mean().item()
    row["knn"] = knn_agreement(features[:, 0], labels)
    return row, features[:, 0], labels


def iid_batch_knn(features: torch.Tensor, labels: torch.Tensor, domains: torch.Tensor, batch: int = 64) -> dict:
    """Per domain, the mean share of an image's 5 nearest neighbours within its i.i.d. batch (drawn from the
    stream of every domain, as LAME's batches are) that share its label."""
    order = torch.randperm(len(labels), generator=torch.Generator().manual_seed(0))
    shares: dict[int, list[float]] = {}
    for i in range(0, len(order) - batch + 1, batch):
        index = order[i : i + batch]
        similarity = features[index] @ features[index].T
        similarity.fill_diagonal_(-float("inf"))
        neighbours = similarity.topk(5, dim=1).indices
        same = (labels[index][neighbours] == labels[index][:, None]).float().mean(1)
        for domain, share in zip(domains[index].tolist(), same.tolist()):
            shares.setdefault(domain, []).append(share)
    return {domain: sum(v) / len(v) for domain, v in shares.items()}


def table(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(header) + " |", "|" + "---|" * len(header), *("| " + " | ".join(r) + " |" for r in rows)]


def pct(value: float) -> str:
    return f"{100 * value:.1f}"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="tta-world-resnet")
    parser.add_argument("--n", type=int, default=200, help="scenes a domain (tta-predict's README run: 200)")
    parser.add_argument("--severity", type=int, default=3)
    parser.add_argument("--seed", type=int, default=10_000, help="scenes' seed (tta-predict's default data)")
    parser.add_argument("--views", type=int, default=64)
    parser.add_argument(
        "--scale-models",
        default=",".join(SCALE_MODELS),
        help="models for table 1: NAME or NAME@PRETRAINED (open_clip tag or file); a shipped world model@random: "
        "its architecture freshly initialised",
    )
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.time()
    command = " ".join(["python benchmarks/world_limits.py", *(sys.argv[1:] if argv is None else argv)])
    lines = [
        "# What limits TPT, STS and LAME on the offline world",
        "",
        f"`{command}`; {args.n} scenes a domain, severity {args.severity}, seed {args.seed}, "
        f"{args.views} crop + flip views, {args.threads} CPU thread(s).",
        "",
        f"## 1. One step of lr {LR}: context, class text features, and the class spacing",
        "",
        'Random-sign steps of the 4 context tokens of "a photo of a" (20 draws); the world\'s 30 class names. '
        "ViT-B-16 and RN50: CLIP's architectures at their real size with random weights (the scale of a real "
        "tower); @random: a shipped model's architecture freshly initialised.",
        "",
    ]
    scale_rows = []
    for name in args.scale_models.split(","):
        s = step_scale(name)
        scale_rows.append(
            [
                name,
                str(s["width"]),
                f"{s['ctx_norm']:.3f}",
                f"{s['step_norm']:.3f}",
                f"{s['step_norm'] / s['ctx_norm']:.2f}",
                f"{s['move']:.4f}",
                f"{s['spacing']:.3f}",
                f"{s['nearest']:.3f}",
                f"{s['move'] / s['nearest']:.3f}",
            ]
        )
        print(scale_rows[-1], flush=True)
    lines += table(
        [
            "model",
            "text width",
            "context token norm",
            "step norm per token",
            "step / norm",
            "class features' move",
            "mean class spacing",
            "nearest class",
            "move / nearest",
        ],
        scale_rows,
    )
    vlm = create_vlm(args.model)
    prompt = PromptLearner(vlm, CLASS_NAMES)
    rows, originals, labels = [], [], []
    for domain in DOMAINS:
        row, features, domain_labels = domain_row(vlm, prompt, domain, args.n, args.severity, args.seed, args.views)
        rows.append(row)
        originals.append(features)
        labels.append(domain_labels)
        print(domain, {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()}, flush=True)
    keys = ["zero_shot", "confidence", "kept_right", "kept_agree", "views", "reach", "tpt1", "tpt_changed"]
    keys += ["tpt_move", "tpt1_reach", "tpt4", "tpt4_reach", "sts", "sts_move"]
    rows.append(
        {"domain": "shifted mean", "margin": None} | {k: sum(r[k] for r in rows[1:]) / (len(rows) - 1) for k in keys}
    )

    def cells(r: dict) -> list[str]:
        margin = "" if r["margin"] is None else f"{r['margin']:.3f}"
        out = [r["domain"], pct(r["zero_shot"]), pct(r["confidence"]), margin]
        out += [pct(r[k]) for k in ("kept_right", "kept_agree", "views", "reach", "tpt1", "tpt_changed")]
        out += [f"{r['tpt_move']:.4f}", pct(r["tpt1_reach"]), pct(r["tpt4"]), pct(r["tpt4_reach"]), pct(r["sts"])]
        return [*out, f"{r['sts_move']:.4f}"]

    lines += [
        "",
        f"## 2. Per domain: what the confident views know, and what TPT and STS do with it ({args.model})",
        "",
        "Accuracy in %. margin: median cosine gap between the first and second class on the original view. "
        "kept views: the 6 most confident of 64. reach: scenes the kept views' average gets right and the "
        "original wrong; share of reach: of those, the share TPT turns right. move: mean |t' - t| of the class "
        "text features (TPT) or of the prototypes' steering (STS).",
        "",
        *table(
            [
                "domain",
                "zero-shot",
                "confidence",
                "margin",
                "kept views naming the label",
                "kept views' agreement",
                "views baseline",
                "reach",
                "TPT 1 step",
                "changed",
                "TPT move",
                "share of reach, 1 step",
                "TPT 4 steps",
                "share of reach, 4 steps",
                "STS",
                "STS move",
            ],
            [cells(r) for r in rows],
        ),
        "",
        f"## 2b. Does the context change the world model's predictions? ({args.model})",
        "",
        "Zero-shot accuracy (%) of the original view with each of the world's training caption templates, their "
        "ensemble (mean text feature), and a prompt naming the domain's style (CLIP's own ImageNet templates name "
        'styles: "a blurry photo of a {}.", "a sketch of a {}."). spread: best minus worst single template.',
        "",
    ]
    template_rows = []
    with torch.no_grad():
        per_template = [vlm.class_text_features(CLASS_NAMES, [t]) for t in CAPTION_TEMPLATES]
        ensemble = vlm.class_text_features(CLASS_NAMES, list(CAPTION_TEMPLATES))

        def accuracy(features: torch.Tensor, domain_labels: torch.Tensor, text: torch.Tensor) -> float:
            return ((features @ text.T).argmax(-1) == domain_labels).float().mean().item()

        for domain, features, domain_labels in zip(DOMAINS, originals, labels):
            accs = [accuracy(features, domain_labels, t) for t in per_template]
            style = STYLE_PROMPTS.get(domain)
            styled = accuracy(features, domain_labels, vlm.class_text_features(CLASS_NAMES, [style])) if style else None
            template_rows.append(
                [
                    domain,
                    *(pct(a) for a in accs),
                    pct(max(accs) - min(accs)),
                    pct(accuracy(features, domain_labels, ensemble)),
                    "" if styled is None else pct(styled),
                ]
            )
    lines += table(
        ["domain", *(f"`{t}`" for t in CAPTION_TEMPLATES), "spread", "ensemble", "style prompt"], template_rows
    )
    in_batch = iid_batch_knn(
        torch.cat(originals), torch.cat(labels), torch.arange(len(DOMAINS)).repeat_interleave(args.n)
    )
    lines += [
        "",
        "## 3. LAME's neighbourhoods",
        "",
        "5-NN label agreement of the original view's features among the domain's images, and within i.i.d. "
        "batches of 64 drawn from the stream of every domain (LAME's batches; about 2 images of a class per "
        "batch); mean top probability.",
        "",
        *table(
            ["domain", "accuracy", "5-NN, whole domain", "5-NN, i.i.d. batches of 64", "mean top probability"],
            [
                [
                    r["domain"],
                    pct(r["zero_shot"]),
                    pct(r["knn"]),
                    pct(in_batch[d]) if d in in_batch else "",
                    pct(r["confidence"]),
                ]
                for d, r in enumerate(rows[: len(DOMAINS)])
            ],
        ),
        "",
        f"Run time: {time.time() - start:.0f} s.",
    ]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(text)


if __name__ == "__main__":
    main()
