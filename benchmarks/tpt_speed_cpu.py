"""TPT on the CPU: our batched implementation against a straightforward per-image loop.

    python benchmarks/tpt_speed_cpu.py [--images 64] [--batch 16]

Both run in the same process on the same images and the same per-sample views, in fp32, with
the shipped tiny CLIP (30 classes, 64 views). The straightforward loop is written the way the
reference code works: one image at a time, full-length text sequences (the whole context
length), one forward with gradients whose output serves both the view selection and the loss,
then a fresh forward for the prediction. Ours: several images at once, one context each,
sequences cut after the last end-of-text token. The script checks that both give the same
predictions and prints ms per image for the whole method and for its parts.
"""

from __future__ import annotations

import argparse
import time

import torch

from tta.augment import make_views
from tta.callbacks.base import sample_seed
from tta.methods.entropy import marginal_entropy, select_confident
from tta.methods.tpt import tpt_adapt
from tta.models import PromptLearner, create_vlm
from tta.world import CLASS_NAMES, render_domain


def straightforward_tpt(vlm, prompt, image, seed, n_views=64, lr=5e-3):
    """One image, reference style: fwd with grad (selection + loss), step, fwd for the prediction."""
    with torch.no_grad():
        views = make_views([image], image.unsqueeze(0), n_views, [seed])[0]
        features = vlm.encode_image(views)  # V x D
    context = prompt.initial_context.clone().requires_grad_(True)
    optimizer = torch.optim.AdamW([context], lr=lr)
    logits = vlm.logits(features, prompt.text_features(context))  # V x C
    selected = select_confident(logits.detach().unsqueeze(0), 0.1)[0]
    loss = marginal_entropy(logits[selected].unsqueeze(0)).sum()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    with torch.no_grad():
        return vlm.logits(features[:1], prompt.text_features(context))[0]


def ours(vlm, prompt, images, seeds, n_views=64, batch=16):
    out = []
    for i in range(0, len(seeds), batch):
        with torch.no_grad():
            views = make_views(list(images[i : i + batch]), images[i : i + batch], n_views, seeds[i : i + batch])
            features = vlm.encode_image(views.flatten(0, 1), batch_size=64).view(len(seeds[i : i + batch]), n_views, -1)
        out.append(tpt_adapt(prompt, features, vlm.logits).logits)
    return torch.cat(out)


def timed(fn, *args, **kwargs):
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=64)
    parser.add_argument("--batch", type=int, default=16)
    args = parser.parse_args()
    torch.manual_seed(0)
    vlm = create_vlm("tta-world-clip")
    images = render_domain("blur", 3, args.images, seed=10_000).images
    seeds = [sample_seed(0, i) for i in range(args.images)]
    fast_prompt, full_prompt = PromptLearner(vlm, CLASS_NAMES), PromptLearner(vlm, CLASS_NAMES, truncate=False)

    ours(vlm, fast_prompt, images[:4], seeds[:4], batch=4)  # warm-up
    straightforward_tpt(vlm, full_prompt, images[0], seeds[0])

    ours_logits, ours_s = timed(ours, vlm, fast_prompt, images, seeds, batch=args.batch)
    ref_logits, ref_s = timed(
        lambda: torch.stack([straightforward_tpt(vlm, full_prompt, im, s) for im, s in zip(images, seeds)])
    )
    # the parts: views + image tower (same in both), and the adaptation itself
    with torch.no_grad():
        feats, enc_s = timed(
            lambda: torch.stack(
                [
                    vlm.encode_image(make_views([images[i]], images[i : i + 1], 64, [seeds[i]])[0])
                    for i in range(args.images)
                ]
            )
        )
    _, ours_adapt_s = timed(
        lambda: [
            tpt_adapt(fast_prompt, feats[i : i + args.batch], vlm.logits) for i in range(0, args.images, args.batch)
        ]
    )
    _, ref_adapt_s = timed(lambda: [tpt_adapt(full_prompt, feats[i : i + 1], vlm.logits) for i in range(args.images)])

    same = (ours_logits.argmax(-1) == ref_logits.argmax(-1)).float().mean().item()
    diff = (ours_logits - ref_logits).abs().max().item()
    n = args.images
    print(
        f"tiny CLIP, {len(CLASS_NAMES)} classes, 64 views, {n} images, {torch.get_num_threads()} CPU threads; "
        f"text sequence {fast_prompt.seq_len} vs {full_prompt.seq_len} tokens"
    )
    print("| implementation | ms / image (whole TPT) | ms / image (adaptation only) |")
    print("|---|---|---|")
    print(
        f"| straightforward: one image at a time, full-length text | {1000 * ref_s / n:.1f} | "
        f"{1000 * ref_adapt_s / n:.1f} |"
    )
    print(
        f"| ours: {args.batch} images at once, text cut at the last end-of-text | {1000 * ours_s / n:.1f} | "
        f"{1000 * ours_adapt_s / n:.1f} |"
    )
    print(f"| speed-up | {ref_s / ours_s:.2f}x | {ref_adapt_s / ours_adapt_s:.2f}x |")
    print(f"views + image tower alone (shared by both): {1000 * enc_s / n:.1f} ms / image")
    print(f"same predictions: {100 * same:.1f}% of images; max |logit difference| {diff:.2e}")


if __name__ == "__main__":
    main()
